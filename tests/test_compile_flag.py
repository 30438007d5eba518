"""--compile: the flag of every training script and of synthesis compiles the trained / sampled
networks in place (nn.Module.compile, state_dict keys unchanged). The compilation itself is not run
here (about a minute of CPU per network); docs/evaluation.md has its measured cost and gain."""
import torch

from sample.runtime import compile_module


def test_compile_module_compiles_in_place_only_when_asked(monkeypatch):
    compiled = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, *a, **k: compiled.append(self))
    net = torch.nn.Linear(2, 2)
    keys = list(net.state_dict())
    assert compile_module(net, False) is net and compiled == []
    assert compile_module(net, True) is net and compiled == [net]
    assert list(net.state_dict()) == keys


def test_every_stage_has_the_flag():
    from sample.synthesize import RUN_ONLY, SynthesizeConfig
    from sample.synthesize import get_args_parser as synth_parser
    from train.concept import get_args_parser as concept_parser
    from train.condition import get_args_parser as condition_parser
    from train.prior import get_args_parser as prior_parser

    for parser in (concept_parser(), condition_parser(), prior_parser(), synth_parser()):
        assert parser.parse_args(["--compile"]).compile is True
        assert parser.parse_args([]).compile is False
    assert "compile" in RUN_ONLY and not SynthesizeConfig().compile  # how, not what, is made
