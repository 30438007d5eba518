"""diffusers / transformers as oracles for our folders: they load what save_diffusers writes and
compute the same outputs, and folders they write (their full config.json field sets,
transformers 5 text layout) load into ours with the same outputs."""
import pytest
import torch

from model.stable_diffusion import StableDiffusion, preset
from weights import load_pipeline, save_diffusers

TOLERANCE = 1e-5
PROMPTS = ["an image of a sks crack", "a photo of a cat", ""]


def random_model(name: str) -> StableDiffusion:
    torch.manual_seed(0)
    model = StableDiffusion(preset(name)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.1)
    return model


def max_diff(a, b) -> float:
    return (a - b).abs().max().item()


def compare_components(model, unet, vae, text_encoder, tokenizer):
    """Our modules vs diffusers/transformers ones on the same inputs."""
    tokens = model.tokenizer(PROMPTS)
    reference_tokens = tokenizer(PROMPTS, padding="max_length", max_length=77, truncation=True,
                                 return_tensors="pt").input_ids
    assert torch.equal(tokens, reference_tokens)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 4, 8, 8, generator=g)
    t = torch.tensor([1, 500, 999])
    images = torch.rand(2, 3, 64, 64, generator=g) * 2 - 1
    with torch.no_grad():
        context = model.text_encoder(tokens)
        assert context.abs().max() > 0.1
        assert max_diff(context, text_encoder(tokens).last_hidden_state) <= TOLERANCE
        eps = model.unet(x, t, context)
        assert eps.abs().max() > 0.1
        assert max_diff(eps, unet(x, t, encoder_hidden_states=context).sample) <= TOLERANCE
        posterior, reference = model.vae.encode(images), vae.encode(images).latent_dist
        assert max_diff(posterior.mean, reference.mean) <= TOLERANCE
        assert max_diff(posterior.logvar, reference.logvar) <= TOLERANCE
        assert max_diff(model.vae.decode(x[:2]), vae.decode(x[:2]).sample) <= TOLERANCE


@pytest.mark.parametrize("name", ["tiny", "tiny-sd2"])
def test_diffusers_loads_our_folder_with_the_same_outputs(name, tmp_path):
    from diffusers import StableDiffusionPipeline

    model = random_model(name)
    folder = save_diffusers(model, tmp_path / "pipe")
    pipe = StableDiffusionPipeline.from_pretrained(str(folder))
    assert pipe.scheduler.config.prediction_type == model.prediction_type
    assert pipe.unet.config.sample_size * 8 == model.config.image_size
    compare_components(model, pipe.unet.eval(), pipe.vae.eval(), pipe.text_encoder.eval(), pipe.tokenizer)


def test_a_pipeline_diffusers_wrote_loads_into_ours(tmp_path):
    """diffusers' own save_pretrained (all its config fields, transformers-5 text keys, v-prediction
    scheduler) -> load_pipeline -> the same outputs."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    ours = random_model("tiny-sd2")
    reference_folder = save_diffusers(ours, tmp_path / "ours")  # only for the tokenizer files and sizes
    torch.manual_seed(3)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, attention_head_dim=(2, 4), use_linear_projection=True, norm_num_groups=8)
    vae = AutoencoderKL(block_out_channels=(32, 64, 64, 64), down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, norm_num_groups=8,
                        layers_per_block=1, sample_size=64)
    text = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                                        num_attention_heads=4, hidden_act="gelu", max_position_embeddings=77))
    with torch.no_grad():
        for module in (unet, vae, text):
            for p in module.parameters():
                p.normal_(0.0, 0.1)
    tokenizer = CLIPTokenizer.from_pretrained(str(reference_folder / "tokenizer"))
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              prediction_type="v_prediction")
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(str(tmp_path / "theirs"))

    loaded, info = load_pipeline(tmp_path / "theirs", return_info=True)
    assert info.ok and info.family == "sd2"  # gelu text encoder, no 768/1024 context: from the text layout
    assert (loaded.prediction_type, info.prediction_reason) == ("v_prediction", "scheduler/scheduler_config.json")
    assert loaded.config.unet == preset("tiny-sd2").unet
    assert loaded.config.text.pad_token_id == 0 and loaded.config.text.output_layer == -1
    assert "transformers 5" in info.components["text_encoder"].layout
    compare_components(loaded, unet.eval(), vae.eval(), text.eval(), tokenizer)
