"""Flag spellings users bring from diffusers / kohya: underscores, familiar aliases, renamed flags,
--config / --print-config on every stage, `defectsynth <stage> --help`, `defectsynth --version`."""
import json

import pytest

from defectsynth import __version__
from defectsynth.cli import STAGES, main as defectsynth_main
from defectsynth.errors import UserError
from defectsynth.runconfig import (FAMILIAR, config_from_args, config_from_dict, load_config_json,
                                   parser_from_dataclass, save_config_json)
from sample.generate import GenerateConfig
from sample.synthesize import SynthesizeConfig
from train.concept import ConceptConfig
from train.condition import ConditionConfig


def parse(cls, argv):
    return config_from_args(cls, parser_from_dataclass(cls).parse_args(argv))


def test_underscore_spellings_parse_to_the_same_config():
    hyphen = parse(ConceptConfig, ["--num-class-images", "7", "--class-noun", "steel", "--no-with-prior",
                                   "--train-text-encoder", "--lr-warmup-steps", "3"])
    underscore = parse(ConceptConfig, ["--num_class_images", "7", "--class_noun", "steel", "--no_with_prior",
                                       "--train_text_encoder", "--lr_warmup_steps=3"])
    assert hyphen == underscore
    assert (hyphen.num_class_images, hyphen.class_noun, hyphen.with_prior, hyphen.train_text_encoder) == (
        7, "steel", False, True)


def test_diffusers_and_kohya_names_parse_to_the_same_config():
    ours = parse(ConceptConfig, [
        "--ckpt", "m.safetensors", "--out", "o", "--data", "d", "--class-dir", "c", "--lr", "2e-6",
        "--batch-size", "2", "--steps", "400", "--grad-accum", "4", "--checkpoint-every", "100",
        "--resume", "latest", "--precision", "fp32", "--with-prior", "--keep-last", "3", "--class-batch-size", "2",
        "--adam-eps", "1e-7", "--weight-decay", "0.0", "--seed", "5", "--resolution", "512"])
    diffusers = parse(ConceptConfig, [
        "--pretrained_model_name_or_path", "m.safetensors", "--output_dir", "o", "--instance_data_dir", "d",
        "--class_data_dir", "c", "--learning_rate", "2e-6", "--train_batch_size", "2", "--max_train_steps", "400",
        "--gradient_accumulation_steps", "4", "--checkpointing_steps", "100", "--resume_from_checkpoint", "latest",
        "--mixed_precision", "no", "--with_prior_preservation", "--checkpoints_total_limit", "3",
        "--sample_batch_size", "2", "--adam_epsilon", "1e-7", "--adam_weight_decay", "0.0", "--seed", "5",
        "--resolution", "512"])
    kohya = parse(ConceptConfig, [
        "--pretrained_model_name_or_path", "m.safetensors", "--output_dir", "o", "--train_data_dir", "d",
        "--reg_data_dir", "c", "--learning_rate", "2e-6", "--train_batch_size", "2", "--max_train_steps", "400",
        "--gradient_accumulation_steps", "4", "--save_every_n_steps", "100", "--resume", "latest",
        "--mixed_precision", "no", "--with_prior", "--keep_last", "3", "--class_batch_size", "2",
        "--adam_eps", "1e-7", "--weight_decay", "0.0", "--seed", "5", "--resolution", "512"])
    assert ours == diffusers == kohya
    assert ours.precision == "fp32" and ours.grad_accum == 4 and ours.ckpt == "m.safetensors"


def test_every_familiar_name_targets_a_real_field_of_some_stage():
    from dataclasses import fields
    stage_fields = {f.name for cls in (ConceptConfig, ConditionConfig, GenerateConfig, SynthesizeConfig)
                    for f in fields(cls)}
    from eval.paper import PaperConfig
    stage_fields |= {f.name for f in fields(PaperConfig)}
    assert {target for target, _ in FAMILIAR.values()} <= stage_fields


def test_a_familiar_value_outside_our_choices_is_one_line_naming_the_flag():
    with pytest.raises(UserError, match="--mixed_precision.*'fp8'"):
        parse(ConceptConfig, ["--mixed_precision", "fp8"])


@pytest.mark.parametrize("flag", ["--validation-steps", "--validation_steps"])
def test_the_ambiguous_validation_steps_flag_is_refused_with_both_meanings_named(flag):
    with pytest.raises(UserError, match="--validation-sampler-steps.*--validate-every"):
        parse(ConceptConfig, [flag, "500"])


def test_old_configs_with_validation_steps_load_with_a_deprecation_line(tmp_path, capsys):
    path = tmp_path / "config.json"
    old = {"validation_steps": 13, "num_validation": 3, "steps": 9}
    path.write_text(json.dumps(old))
    cfg = load_config_json(ConditionConfig, path)
    assert (cfg.validation_sampler_steps, cfg.num_validation_images, cfg.steps) == (13, 3, 9)
    err = capsys.readouterr().err
    assert "'validation_steps' is deprecated, read as 'validation_sampler_steps'" in err
    assert "'num_validation' is deprecated, read as 'num_validation_images'" in err
    with pytest.raises(UserError, match="keep only 'validation_sampler_steps'"):
        config_from_dict(ConditionConfig, {"validation_steps": 1, "validation_sampler_steps": 2})


def test_one_name_per_concept_old_flags_warn(capsys):
    assert parse(ConditionConfig, ["--num-validation", "3"]).num_validation_images == 3
    assert "--num-validation is deprecated, use --num-validation-images" in capsys.readouterr().err
    assert parse(GenerateConfig, ["--batch", "2"]) == parse(GenerateConfig, ["--batch-size", "2"]) \
        == parse(GenerateConfig, ["--batch_size", "2"])
    assert "--batch is deprecated, use --batch-size" in capsys.readouterr().err
    assert parse(SynthesizeConfig, ["--token", "zwx"]).identifier == "zwx"
    assert "--token is deprecated, use --identifier" in capsys.readouterr().err
    assert parse(SynthesizeConfig, ["--batch-size", "3"]).batch == 3


def test_config_file_gives_defaults_and_flags_override(tmp_path, capsys):
    saved = ConceptConfig(steps=33, class_noun="steel", out="first")
    save_config_json(saved, tmp_path / "config.json")
    cfg = parse(ConceptConfig, ["--config", str(tmp_path / "config.json"), "--out", "second"])
    assert cfg == ConceptConfig(steps=33, class_noun="steel", out="second")
    with pytest.raises(SystemExit) as stop:
        parse(ConceptConfig, ["--config", str(tmp_path / "config.json"), "--print_config", "--max_train_steps", "5"])
    assert stop.value.code == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["steps"] == 5 and printed["class_noun"] == "steel"
    assert config_from_dict(ConceptConfig, printed) == ConceptConfig(steps=5, class_noun="steel", out="first")


def test_config_file_with_an_unknown_key_is_one_line(tmp_path):
    (tmp_path / "bad.json").write_text(json.dumps({"stepz": 3}))
    with pytest.raises(UserError, match="unknown field.*'stepz'"):
        parse(ConceptConfig, ["--config", str(tmp_path / "bad.json")])


@pytest.mark.parametrize("stage", [s for s in STAGES if s != "run"])
def test_every_stage_help_says_defectsynth_stage_and_takes_config(stage, capsys):
    with pytest.raises(SystemExit):
        defectsynth_main([stage, "--help"])
    text = capsys.readouterr().out
    assert text.startswith(f"usage: defectsynth {stage} ")
    assert "--config FILE" in text and "--print-config" in text


def test_version(capsys):
    assert defectsynth_main(["--version"]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"defectsynth {__version__} (") and "torch " in line


def test_an_old_run_config_with_stage_keys_of_before_the_rename_loads(tmp_path, capsys):
    from defectsynth.run import RunConfig
    path = tmp_path / "run_config.json"
    path.write_text(json.dumps({"seed": 3, "concept": {"validation_steps": 7},
                                "condition": {"num_validation": 2, "validation_steps": 5},
                                "synthesize": {"token": "zwx", "batch": 4},
                                "provenance": {"defectsynth": "0.0.1"}}))
    cfg = load_config_json(RunConfig, path)
    assert (cfg.seed, cfg.concept.validation_sampler_steps) == (3, 7)
    assert (cfg.condition.num_validation_images, cfg.condition.validation_sampler_steps) == (2, 5)
    assert (cfg.synthesize.identifier, cfg.synthesize.batch) == ("zwx", 4)
    err = capsys.readouterr().err
    assert f"{path}.concept: key 'validation_steps' is deprecated" in err and "'token' is deprecated" in err
