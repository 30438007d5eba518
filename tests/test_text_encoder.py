"""Text encoder: configs, tiny-model behaviour, checkpoint layout, and parity through weights/ with
transformers' CLIPTextModel (SD 1.x) and open_clip's text tower (SD 2.x, penultimate layer)."""
from dataclasses import FrozenInstanceError

import pytest
import torch

from model.text_encoder import TextEncoder, TextEncoderConfig
from model.tokenizer import Tokenizer

PROMPTS = ["a photo of a cat", "an image of a sks with a blowhole crack on a magnetic tile", ""]
TOLERANCE = 1e-5  # docs/testing.md: float32 parity on tiny configs


def _random_tokens(batch: int = 3, length: int = 77, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 49408, (batch, length), generator=generator)


def _randomize(module: torch.nn.Module, seed: int = 0) -> None:
    """Overwrite every parameter with seeded, well-scaled random values. Stock initialisations
    leave biases at zero and LayerNorms at identity, which would let some mapping mistakes
    (a swapped bias, a dropped LayerNorm) go unnoticed by a parity test."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=generator)
            if p.dim() >= 2:
                p.copy_(noise / p.shape[-1] ** 0.5)  # matrices and embeddings: unit-variance outputs
            elif name.endswith("weight"):
                p.copy_(1 + 0.2 * noise)  # LayerNorm gains
            else:
                p.copy_(0.2 * noise)  # biases, logit_scale


# ----------------------------------------------------------------------------- configs

def test_presets_hold_the_sd_values():
    l = TextEncoderConfig.clip_l()
    assert (l.vocab_size, l.max_length, l.width, l.layers, l.heads, l.mlp_dim) == (49408, 77, 768, 12, 12, 3072)
    assert (l.activation, l.output_layer, l.pad_token_id, l.norm_eps, l.projection_dim) == \
        ("quick_gelu", -1, 49407, 1e-5, None)
    h = TextEncoderConfig.openclip_h()
    assert (h.vocab_size, h.max_length, h.width, h.layers, h.heads, h.mlp_dim) == (49408, 77, 1024, 24, 16, 4096)
    assert (h.activation, h.output_layer, h.pad_token_id, h.norm_eps, h.projection_dim) == \
        ("gelu", -2, 0, 1e-5, 1024)
    assert l.head_dim == h.head_dim == 64
    # The tiny UNets use context_dim 32; SD2 toy needs >= 3 blocks for "penultimate" to mean something.
    t, t2 = TextEncoderConfig.tiny(), TextEncoderConfig.tiny_sd2()
    assert t.width == t2.width == 32
    assert (t.activation, t.output_layer, t.pad_token_id, t.projection_dim) == ("quick_gelu", -1, 49407, None)
    assert (t2.activation, t2.output_layer, t2.pad_token_id, t2.projection_dim) == ("gelu", -2, 0, 32)
    assert t2.layers >= 3 and t2.layers_run == t2.layers - 1


def test_config_is_frozen_and_validated():
    with pytest.raises(FrozenInstanceError):
        TextEncoderConfig.tiny().width = 64
    with pytest.raises(ValueError, match="activation"):
        TextEncoderConfig(activation="relu")
    with pytest.raises(ValueError, match="divisible"):
        TextEncoderConfig(width=30, heads=4)
    with pytest.raises(ValueError, match="output_layer"):
        TextEncoderConfig(layers=2, output_layer=-3)
    with pytest.raises(ValueError, match="output_layer"):
        TextEncoderConfig(output_layer=0)


# ----------------------------------------------------------------------------- tiny model behaviour

@pytest.mark.parametrize("config", [TextEncoderConfig.tiny(), TextEncoderConfig.tiny_sd2()], ids=["sd1", "sd2"])
def test_tiny_shape_dtype_and_seeded_determinism(config):
    tokens = Tokenizer.from_config(config)(PROMPTS)
    torch.manual_seed(123)
    first = TextEncoder(config).eval()
    torch.manual_seed(123)
    second = TextEncoder(config).eval()
    with torch.no_grad():
        out = first(tokens)
        assert out.shape == (len(PROMPTS), 77, config.width) and out.dtype == torch.float32
        assert torch.isfinite(out).all()
        assert torch.equal(out, second(tokens))  # same seed, same weights, same output
        assert torch.equal(out, first(tokens))  # no hidden state between calls
        # A row does not depend on the other rows of the batch.
        assert torch.allclose(out[1:2], first(tokens[1:2]), atol=1e-6, rtol=0)


@pytest.mark.parametrize("config", [TextEncoderConfig.tiny(), TextEncoderConfig.tiny_sd2()], ids=["sd1", "sd2"])
def test_causal_later_tokens_do_not_change_earlier_outputs(config):
    model = TextEncoder(config).eval()
    _randomize(model)
    tokens = _random_tokens(batch=2)
    changed = tokens.clone()
    changed[:, 40] = (changed[:, 40] + 1) % config.vocab_size
    with torch.no_grad():
        difference = (model(tokens) - model(changed)).abs().amax(dim=(0, 2))  # (77,)
    assert difference[:40].max() == 0  # positions 0..39 never see position 40
    assert difference[40:].min() > 1e-4  # position 40 and everything after it do


def test_penultimate_output_never_runs_the_last_block():
    model = TextEncoder(TextEncoderConfig.tiny_sd2()).eval()
    _randomize(model)
    tokens = _random_tokens()
    with torch.no_grad():
        before = model(tokens)
        _randomize(model.encoder.layers[-1], seed=5)
        assert torch.equal(model(tokens), before)
        model.final_layer_norm.bias.add_(1.0)  # ... but the final LayerNorm is applied
        assert not torch.allclose(model(tokens), before)


def test_shorter_sequences_and_bad_inputs():
    model = TextEncoder(TextEncoderConfig.tiny()).eval()
    tokens = _random_tokens()
    with torch.no_grad():
        # Causality again: a prefix of the sequence gives the prefix of the output.
        assert torch.allclose(model(tokens[:, :10]), model(tokens)[:, :10], atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="78 tokens"):
        model(torch.zeros(1, 78, dtype=torch.long))
    with pytest.raises(ValueError, match="integer token ids"):
        model(torch.zeros(1, 77))


def test_bfloat16_runs_with_float32_layernorm():
    model = TextEncoder(TextEncoderConfig.tiny_sd2()).eval()
    _randomize(model)
    tokens = _random_tokens()
    with torch.no_grad():
        reference = model(tokens)
        low = model.to(torch.bfloat16)(tokens)
    assert low.dtype == torch.bfloat16
    assert (low.float() - reference).abs().max() < 0.1  # bf16 keeps ~3 digits of unit-scale values


# ----------------------------------------------------------------------------- checkpoint layout

def test_meta_construction_and_assign_load_round_trip():
    config = TextEncoderConfig.tiny_sd2()
    source = TextEncoder(config).eval()
    _randomize(source)
    with torch.device("meta"):
        target = TextEncoder(config)
    assert list(target.buffers()) == []  # no position_ids or mask buffer to disagree with files
    target.load_state_dict(source.state_dict(), strict=True, assign=True)
    target.eval()
    assert all(p.device.type == "cpu" for p in target.parameters())
    tokens = _random_tokens()
    with torch.no_grad():
        assert torch.equal(target(tokens), source(tokens))
    saved = source.state_dict()
    assert all(torch.equal(saved[k], v) for k, v in target.state_dict().items())
    assert saved["text_projection"].shape == (32, 32) and saved["logit_scale"].shape == ()


def test_sd1_keys_and_shapes_equal_transformers_clip_text_model():
    # SD 1.5's text_encoder/config.json; transformers 5 names its keys without "text_model.",
    # i.e. exactly the SD 1.x single-file names with cond_stage_model.transformer.text_model. stripped.
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):
        reference = CLIPTextModel(CLIPTextConfig(
            vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
            num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
            layer_norm_eps=1e-5, projection_dim=768))
        ours = TextEncoder(TextEncoderConfig.clip_l())
    expected = {k.removeprefix("text_model."): tuple(v.shape) for k, v in reference.state_dict().items()
                if not k.endswith("position_ids")}
    got = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert got == expected
    assert list(got) == list(expected)  # same order as SD 1.x files list them
    assert len(got) == 196


def test_sd2_parameters_match_open_clip_vit_h_text_tower():
    # OpenCLIP fuses q/k/v into one in_proj (3W, W) and names differ, so compare per-part sizes;
    # weights/ owns the renaming. text_projection and logit_scale keep OpenCLIP's shapes exactly.
    import open_clip
    from open_clip.model import CLIP, CLIPVisionCfg

    model_cfg = open_clip.get_model_config("ViT-H-14")
    with torch.device("meta"):
        reference = CLIP(model_cfg["embed_dim"], CLIPVisionCfg(layers=1, width=32, head_width=16, patch_size=8,
                                                               image_size=16), model_cfg["text_cfg"])
        ours = TextEncoder(TextEncoderConfig.openclip_h())
    del reference.visual  # as SD 2.x's FrozenOpenCLIPEmbedder does
    theirs = reference.state_dict()
    mine = ours.state_dict()
    assert len(theirs) == 294 and len(mine) == 294 + 24 * 4  # 3 weights + 3 biases per block from each in_proj
    assert sum(v.numel() for v in theirs.values()) == sum(v.numel() for v in mine.values())
    assert mine["text_projection"].shape == theirs["text_projection"].shape == (1024, 1024)
    assert mine["logit_scale"].shape == theirs["logit_scale"].shape == ()
    assert mine["embeddings.position_embedding.weight"].shape == theirs["positional_embedding"].shape
    block = theirs["transformer.resblocks.23.attn.in_proj_weight"].shape
    assert (3 * mine["encoder.layers.23.self_attn.q_proj.weight"].shape[0], 1024) == block
    assert mine["encoder.layers.23.mlp.fc1.weight"].shape == theirs["transformer.resblocks.23.mlp.c_fc.weight"].shape


# ----------------------------------------------------------------------------- parity through weights/

def test_parity_sd1_transformers_clip_text_model_through_loader(tmp_path):
    from transformers import CLIPTextConfig, CLIPTextModel

    from weights import load_text_encoder

    config = TextEncoderConfig.tiny()
    # Token ids of the SD 1.5 config.json (bos 0, eos 2, pad 1) are CLIP-config leftovers; the
    # loader must not take pad_token_id from them (SD 1.x pads with EOS 49407).
    reference = CLIPTextModel(CLIPTextConfig(
        vocab_size=config.vocab_size, hidden_size=config.width, intermediate_size=config.mlp_dim,
        num_hidden_layers=config.layers, num_attention_heads=config.heads,
        max_position_embeddings=config.max_length, hidden_act="quick_gelu", layer_norm_eps=config.norm_eps,
        projection_dim=config.width, bos_token_id=0, eos_token_id=2, pad_token_id=1)).eval()
    _randomize(reference)
    reference.save_pretrained(tmp_path)  # config.json + model.safetensors, keys without "text_model."

    ours = load_text_encoder(str(tmp_path)).eval()
    assert isinstance(ours, TextEncoder) and ours.config == config
    tokens = torch.cat([Tokenizer.from_config(config)(PROMPTS), _random_tokens()])
    with torch.no_grad():
        expected = reference(input_ids=tokens).last_hidden_state
        got = ours(tokens)
    assert expected.abs().max() > 0.5  # a real signal, not LayerNorm of nothing
    error = (got - expected).abs().max().item()
    assert error <= TOLERANCE, f"max abs difference {error:.3g} > {TOLERANCE}"


def test_parity_sd2_open_clip_penultimate_through_loader(tmp_path):
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg
    from safetensors.torch import save_file

    from weights import load_text_encoder

    # Width 128 with 2 heads: single files hold no head count, and every CLIP text tower SD uses
    # has 64-dim heads, so the loader derives heads = width // 64 from the shapes.
    text_cfg = CLIPTextCfg(context_length=77, vocab_size=49408, width=128, heads=2, layers=3, mlp_ratio=4.0)
    vision_cfg = CLIPVisionCfg(layers=1, width=32, head_width=16, patch_size=8, image_size=16)
    reference = CLIP(embed_dim=64, vision_cfg=vision_cfg, text_cfg=text_cfg).eval()  # gelu, like ViT-H-14
    del reference.visual  # as SD 2.x's FrozenOpenCLIPEmbedder does
    _randomize(reference)
    # The SD 2.x single-file layout: cond_stage_model.model.* (no attn_mask: it is not persistent).
    state = {"cond_stage_model.model." + k: v.contiguous() for k, v in reference.state_dict().items()}
    path = tmp_path / "sd2_text_encoder.safetensors"
    save_file(state, str(path))

    ours = load_text_encoder(str(path)).eval()
    assert isinstance(ours, TextEncoder)
    assert ours.config == TextEncoderConfig(width=128, layers=3, heads=2, mlp_dim=512, activation="gelu",
                                            output_layer=-2, pad_token_id=0, projection_dim=64)
    assert torch.equal(ours.text_projection, reference.text_projection)  # carried for round trips
    assert torch.equal(ours.logit_scale, reference.logit_scale)

    tokens = torch.cat([Tokenizer.from_config(ours.config)(PROMPTS), _random_tokens()])
    with torch.no_grad():
        # SD 2.x FrozenOpenCLIPEmbedder(layer="penultimate").encode_with_transformer: embeddings,
        # every residual block but the last, then ln_final.
        x = reference.token_embedding(tokens) + reference.positional_embedding  # (B, 77, W)
        for block in reference.transformer.resblocks[:-1]:
            x = block(x, attn_mask=reference.attn_mask)
        expected = reference.ln_final(x)
        last_layer = reference.ln_final(reference.transformer(
            reference.token_embedding(tokens) + reference.positional_embedding, attn_mask=reference.attn_mask))
        got = ours(tokens)
    assert expected.abs().max() > 0.5
    assert (got - last_layer).abs().max() > 1e-2  # the layer choice matters, so this checks it
    error = (got - expected).abs().max().item()
    assert error <= TOLERANCE, f"max abs difference {error:.3g} > {TOLERANCE}"
