"""The toy world's shipped models: base denoiser + text encoder, DDIM sampler, technique classifier."""
import json
import os
from dataclasses import asdict, replace

import numpy as np
import pytest
import safetensors
import torch

from embroidery_core.provenance import arithmetic
from embroidery_core.tiny_unet import TinyUNet
from toyworld import HELD_OUT, TECHNIQUES, TRIGGER, VOCAB
from toyworld.generator import PROMPT_LENGTH
from toyworld import classifier as clf
from toyworld import train_base
from toyworld.model import (TOY_UNET, UNCOND, WEIGHTS, ToyTextEncoder, build_toy_model, from_latent,
                                            load_toy_model, read_metadata, to_latent, toy_state_dict)
from toyworld.sample import generate, sigma_schedule

MAX_BASE_BYTES = 20 * 2 ** 20
MAX_CLASSIFIER_BYTES = 2 * 2 ** 20
# Measured on 16 fresh renders per class of unseen designs: see test_classifier_is_small_and_reads_fresh_renders;
# the bar leaves room for torch version differences, not for a broken classifier (chance is 1/41).
CLASSIFIER_MIN_ACCURACY = 0.9
CLASSIFIER_TEST_PER_CLASS = 16
EVAL_SEED = 5_000_000


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The toy networks are tiny: a second thread gains nothing and, on a busy machine, two
    OpenMP threads waiting for each other made these tests many times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def toy():
    return load_toy_model()


def _shapes(state):
    return {k: tuple(v.shape) for k, v in state.items()}


# --- base model --------------------------------------------------------------------------------

def test_shipped_weights_match_the_training_script():
    assert os.path.getsize(WEIGHTS) <= MAX_BASE_BYTES
    with safetensors.safe_open(WEIGHTS, framework="pt") as f:
        shipped = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    unet, encoder = build_toy_model(TOY_UNET)  # what train_base builds
    assert shipped == _shapes(toy_state_dict(unet, encoder))
    meta = read_metadata(WEIGHTS)
    assert json.loads(meta["config"]) == json.loads(json.dumps(asdict(TOY_UNET)))
    assert meta["script_version"] == train_base.SCRIPT_VERSION
    assert int(meta["steps"]) > 0 and meta["seed"].isdigit()


def test_training_script_writes_a_loadable_file_of_that_architecture(tmp_path):
    config = train_base.BaseTrainConfig(steps=2, batch=2, warmup=1)
    unet, encoder, done, history, _ = train_base.train(config, log_every=1)
    path = str(tmp_path / "base.safetensors")
    from toyworld.model import save_toy_model

    save_toy_model(path, unet, encoder, {"seed": 0, "steps": done, "script_version": train_base.SCRIPT_VERSION})
    assert done == 2 and len(history) == 2 and all(np.isfinite(history))
    reloaded, _ = load_toy_model(path)
    assert _shapes(reloaded.state_dict()) == _shapes(load_toy_model()[0].state_dict())


def test_training_script_trains_a_wider_unet_with_the_same_head_width(tmp_path):
    path = str(tmp_path / "wide.safetensors")
    assert train_base.main(["--out", path, "--steps", "1", "--batch", "2", "--model-channels", "48"]) == 0
    unet, _ = load_toy_model(path)
    assert unet.cfg.model_channels == 48 and unet.cfg.heads == 3
    assert unet.cfg.model_channels // unet.cfg.heads == TOY_UNET.model_channels // TOY_UNET.heads
    assert train_base.wider(TOY_UNET.model_channels) == TOY_UNET  # the shipped width is the default
    with pytest.raises(SystemExit):
        train_base.main(["--out", path, "--model-channels", "40"])


def test_base_training_resumes_to_the_same_weights(tmp_path):
    """A run stopped at a checkpoint and continued ends with the weights of one never stopped:
    weights, EMA, optimizer and data generator all come back."""
    config = train_base.BaseTrainConfig(steps=4, batch=2, warmup=1, threads=1)
    checkpoint = str(tmp_path / "base.resume")
    unet, encoder, _, straight_history, _ = train_base.train(config, log_every=2)
    straight = toy_state_dict(unet, encoder)
    train_base.train(config, log_every=2, checkpoint=checkpoint, checkpoint_every=3)  # step 3: inside a log window
    assert torch.load(checkpoint, weights_only=False)["step"] == 3
    unet, encoder, done, history, _ = train_base.train(config, log_every=2, checkpoint=checkpoint)
    resumed = toy_state_dict(unet, encoder)
    assert done == 4 and history == straight_history and len(history) == 2  # the loss log too
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    with pytest.raises(ValueError, match="another training"):
        train_base.train(train_base.BaseTrainConfig(steps=5, batch=2, warmup=1, threads=1), checkpoint=checkpoint)


def test_minutes_cap_writes_the_checkpoint_and_the_same_command_continues(tmp_path):
    out = str(tmp_path / "base.safetensors")
    args = ["--out", out, "--steps", "2", "--batch", "2", "--threads", "1"]
    assert train_base.main(args + ["--minutes", "0"]) == 0
    assert not os.path.exists(out) and os.path.exists(train_base.checkpoint_path(out))
    assert train_base.main(args) == 0
    assert read_metadata(out)["steps"] == "2" and not os.path.exists(train_base.checkpoint_path(out))
    assert read_metadata(out)["built_on"] == arithmetic()  # where the file rebuilds bit for bit


def test_device_cpu_writes_the_same_bytes_and_an_absent_or_unknown_device_is_refused(tmp_path, capsys):
    """--device is for the GPU machine: on the CPU it changes nothing (the same tensors and
    metadata, so the shipped file still rebuilds as before), a GPU this machine lacks or an
    unknown name stops before any work."""
    small = ["--steps", "2", "--batch", "2", "--threads", "1"]
    plain, explicit = str(tmp_path / "plain.safetensors"), str(tmp_path / "cpu.safetensors")
    assert train_base.main(["--out", plain] + small) == 0
    assert train_base.main(["--out", explicit, "--device", "cpu"] + small) == 0
    one, other = toy_state_dict(*load_toy_model(plain)), toy_state_dict(*load_toy_model(explicit))
    assert all(torch.equal(one[k], other[k]) for k in one)
    wall_clock = lambda meta: {k: v for k, v in meta.items() if k != "train_minutes"}  # noqa: E731
    assert wall_clock(read_metadata(plain)) == wall_clock(read_metadata(explicit))  # no device entry
    with pytest.raises(SystemExit):
        train_base.main(["--out", str(tmp_path / "x.safetensors"), "--device", "gpu0"] + small)
    assert "--device 'gpu0'" in capsys.readouterr().err
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit):
            train_base.main(["--out", str(tmp_path / "x.safetensors"), "--device", "cuda"] + small)
        assert "no CUDA GPU" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "x.safetensors")


def test_per_step_batches_are_the_same_for_any_number_of_workers_and_a_resume_keeps_the_stream(tmp_path):
    """--workers: each step's batch comes from its own seed, so one worker process and two give
    the same weights; a checkpoint of one stream is not continued with the other."""
    config = train_base.BaseTrainConfig(steps=3, batch=2, warmup=1, threads=1)
    first, second = (toy_state_dict(*train_base.train(config, log_every=1, workers=w)[:2]) for w in (1, 2))
    assert all(torch.equal(first[k], second[k]) for k in first)
    batch, prompts = train_base.step_batch(config, 1)[:2]
    again, same_prompts = train_base.step_batch(config, 1)[:2]
    assert torch.equal(batch, again) and prompts == same_prompts
    assert not torch.equal(batch, train_base.step_batch(config, 2).x0)
    sequential = toy_state_dict(*train_base.train(config, log_every=1)[:2])
    assert any(not torch.equal(first[k], sequential[k]) for k in first)  # another stream, other weights
    checkpoint = str(tmp_path / "base.resume")
    train_base.train(config, checkpoint=checkpoint, checkpoint_every=2, minutes=None, workers=1)
    assert os.path.exists(checkpoint)
    with pytest.raises(ValueError, match="same --workers"):
        train_base.train(config, checkpoint=checkpoint)
    resumed = toy_state_dict(*train_base.train(config, log_every=1, checkpoint=checkpoint, workers=2)[:2])
    assert all(torch.equal(first[k], resumed[k]) for k in first)
    with pytest.raises(ValueError, match="workers"):
        train_base.Batches(config, -1)


def test_a_round_continues_from_a_saved_base_and_records_the_chain(tmp_path):
    first, second = str(tmp_path / "round1.safetensors"), str(tmp_path / "round2.safetensors")
    small = ["--steps", "2", "--batch", "2", "--threads", "1"]
    assert train_base.main(["--out", first] + small) == 0
    assert train_base.main(["--out", second, "--init", first, "--seed", "1"] + small) == 0
    meta = read_metadata(second)
    assert meta["init"] == f"round1.safetensors ({train_base.init_digest(first)})"
    assert meta["total_steps"] == "4" and meta["steps"] == "2"
    start, _ = load_toy_model(first)
    continued, _ = load_toy_model(second)
    fresh = build_toy_model(TOY_UNET)[0]
    moved = lambda a, b: sum(float((x - y).abs().sum().detach()) for x, y in zip(a.parameters(), b.parameters()))
    assert 0 < moved(continued, start) < moved(fresh, start)  # trained on from round 1, not from scratch
    with pytest.raises(SystemExit):  # the run writes next to --out: it may not overwrite its start
        train_base.main(["--out", first, "--init", first] + small)
    config = train_base.BaseTrainConfig(steps=1, batch=2, threads=1, init="0" * 16)
    with pytest.raises(ValueError, match="does not match"):
        train_base.train(config, init_from=first)


def test_high_noise_timesteps_are_drawn_more_often():
    denoiser = train_base.TorchDenoiser(torch.nn.Identity(), "v")
    g = torch.Generator().manual_seed(0)
    sigmas = train_base.sample_sigma(denoiser, 20000, g, 0.75)
    share_high = float((sigmas > denoiser.sigmas[500]).float().mean())
    assert share_high == pytest.approx(1 - 0.5 ** (1 / 0.75), abs=0.02)  # P(u^0.75 > 0.5)
    uniform = train_base.sample_sigma(denoiser, 20000, g, 1.0)
    assert float((uniform > denoiser.sigmas[500]).float().mean()) == pytest.approx(0.5, abs=0.02)


def test_base_training_is_reproducible():
    """The README's "same command, same file": data, noise and timesteps come from the seed."""
    config = train_base.BaseTrainConfig(steps=3, batch=2, warmup=1)
    first, second = (toy_state_dict(*train_base.train(config, log_every=1)[:2]) for _ in range(2))
    assert all(torch.equal(first[k], second[k]) for k in first)
    other = toy_state_dict(*train_base.train(train_base.BaseTrainConfig(steps=3, batch=2, warmup=1, seed=1),
                                             log_every=1)[:2])
    assert any(not torch.equal(first[k], other[k]) for k in first)


def test_load_toy_model_gives_a_frozen_denoiser_and_encoder(toy):
    unet, encoder = toy
    assert isinstance(unet, TinyUNet) and isinstance(encoder, ToyTextEncoder)
    assert not any(p.requires_grad for p in [*unet.parameters(), *encoder.parameters()])
    cond = encoder.encode(["a red circle", f"a red circle in {TRIGGER} style"])
    assert cond.context.shape == (2, PROMPT_LENGTH, TOY_UNET.context_dim)
    x = torch.randn(2, TOY_UNET.in_channels, 16, 16)
    with torch.no_grad():
        assert unet(x, torch.tensor([10.0, 900.0]), cond.context).shape == x.shape


def test_block_presets_exist_in_the_toy_unet(toy):
    names = {n for n, _ in toy[0].named_modules()}
    arch = TOY_UNET.arch()
    assert len(arch.attention_blocks()) == 16  # attention at every level: 6 down, the middle, 9 up
    for preset in ("emolora_style", "blora_style", "blora_content"):
        for module in arch.attention_modules(arch.preset(preset)):
            assert module in names


def test_latent_is_the_shipped_pca_code_and_keeps_embroideries():
    from toyworld.generator import TRAIN_TECHNIQUES, make_design, render_embroidery
    from toyworld.vae import LATENT_CHANNELS, shipped_vae

    vae = shipped_vae()
    assert vae.components.shape == (48, LATENT_CHANNELS)
    assert torch.allclose(vae.components.T @ vae.components, torch.eye(LATENT_CHANNELS), atol=1e-5)
    design = make_design(1_000_001, 64)
    images = torch.from_numpy(np.stack([design.image] + [render_embroidery(design, t, 3)[0]
                                                         for t in TRAIN_TECHNIQUES[::7]]))
    latent = to_latent(images)
    assert latent.shape == (len(images), LATENT_CHANNELS, 16, 16)
    assert 0.5 < float(latent.std()) < 1.5  # every channel about unit spread, like SD's scaled latents
    error = (from_latent(latent) - images.float()).abs().mean(dim=(1, 2, 3))
    assert float(error.max()) < 0.04  # a flat design and stitches survive the code ...
    noise = from_latent(torch.zeros(1, LATENT_CHANNELS, 16, 16))
    assert torch.allclose(noise, noise[:, :4, :4].repeat(1, 16, 16, 1))  # ... and the zero code is the mean patch
    with pytest.raises(ValueError, match="16, h, w"):
        from_latent(torch.zeros(1, 48, 16, 16))


def test_pca_fit_recovers_a_planted_subspace_with_fixed_signs():
    from toyworld.vae import explained, fit_vae

    g = torch.Generator().manual_seed(0)
    basis = torch.linalg.qr(torch.randn(48, 2, generator=g))[0]
    codes = torch.randn(256 * 16, 2, generator=g) * torch.tensor([0.3, 0.1])
    patches = (codes @ basis.T).reshape(256, 16, 48)  # 256 images of 4 x 4 patches, values near 0
    images = torch.nn.functional.pixel_shuffle(patches.movedim(1, -1).reshape(256, 48, 4, 4), 4)
    images = (images.movedim(1, -1) + 1) / 2
    vae = fit_vae(images, 2)
    assert explained(images, vae) > 0.999
    assert torch.allclose(vae.spread, torch.tensor([0.3, 0.1]), rtol=0.05)
    assert torch.allclose((vae.components.T @ basis).abs(), torch.eye(2), atol=1e-2)
    assert bool((vae.components.gather(0, vae.components.abs().argmax(0, keepdim=True)) > 0).all())
    assert torch.allclose(vae.decode(vae.encode(images)), images, atol=1e-4)


def test_a_base_trained_on_another_vae_is_refused(tmp_path, monkeypatch):
    from toyworld import model

    path = str(tmp_path / "base.safetensors")
    model.save_toy_model(path, *model.build_toy_model(), {"prediction": "v"})
    model.load_toy_model(path)
    from toyworld.vae import ToyVAE, save_vae, shipped_vae

    vae = shipped_vae()
    other = str(tmp_path / "vae.safetensors")
    save_vae(str(tmp_path / "same.safetensors"), vae, {"note": "other metadata, same code"})
    monkeypatch.setattr(model, "VAE_WEIGHTS", str(tmp_path / "same.safetensors"))
    model.load_toy_model(path)  # a rebuilt VAE with the same tensors is the same VAE
    save_vae(other, ToyVAE(vae.mean + 0.01, vae.components, vae.spread), {})
    monkeypatch.setattr(model, "VAE_WEIGHTS", other)
    with pytest.raises(ValueError, match="another toy VAE"):
        model.load_toy_model(path)


def test_every_prompt_word_is_in_the_vocabulary(toy):
    _, encoder = toy
    assert encoder.token_embedding.num_embeddings == len(VOCAB)
    encoder.ids([f"a red circle blue star in {t} style" for t in TECHNIQUES])


# --- sampler -----------------------------------------------------------------------------------

def test_sigma_schedule_descends_to_zero():
    sigmas = torch.linspace(0.03, 14.6, 1000)
    full, half = sigma_schedule(sigmas, 5), sigma_schedule(sigmas, 5, strength=0.5)
    assert len(full) == 6 and full[-1] == 0 and torch.all(full[:-1] > full[1:])
    assert full[0] == sigmas[-1] and half[0] < full[0]


def test_sampler_shapes_and_determinism(toy):
    unet, encoder = toy
    prompts = ["a red circle", f"a blue star in {TRIGGER} style"]
    a = generate(unet, encoder, prompts, steps=2, seed=7)
    b = generate(unet, encoder, prompts, steps=2, seed=7)
    c = generate(unet, encoder, prompts, steps=2, seed=8)
    assert a.shape == (2, 64, 64, 3) and a.min() >= 0 and a.max() <= 1
    assert torch.equal(a, b) and not torch.equal(a, c)
    # sample i uses seed + i: the second picture does not depend on the first
    assert torch.allclose(generate(unet, encoder, prompts[1:], steps=2, seed=8), a[1:], atol=1e-5)


def test_ancestral_step_splits_the_next_sigma_and_eta_0_is_ddim():
    from toyworld.sample import ancestral_sigmas

    sigma, nxt = torch.tensor(2.0), torch.tensor(1.0)
    down, up = ancestral_sigmas(sigma, nxt, 1.0)
    assert float(up) == pytest.approx((1.0 * (4.0 - 1.0) / 4.0) ** 0.5)  # the formula, not capped here
    assert float(down ** 2 + up ** 2) == pytest.approx(1.0)  # lands at the next level's variance
    assert ancestral_sigmas(sigma, nxt, 0.0) == (nxt, 0.0 * up)
    assert float(ancestral_sigmas(sigma, nxt, 10.0)[1]) == pytest.approx(1.0)  # capped at sigma_next
    assert ancestral_sigmas(sigma, torch.tensor(0.0), 1.0) == (0.0, 0.0)  # the last step adds nothing
    with pytest.raises(ValueError, match="eta"):
        ancestral_sigmas(sigma, nxt, -0.5)


def test_ancestral_sampling_is_seeded_per_sample_and_differs_from_ddim(toy):
    unet, encoder = toy
    prompts = ["a red circle", f"a blue star in {TRIGGER} style"]
    plain = generate(unet, encoder, prompts, steps=3, seed=7)
    assert torch.equal(generate(unet, encoder, prompts, steps=3, seed=7, eta=0.0), plain)
    a = generate(unet, encoder, prompts, steps=3, seed=7, eta=1.0)
    assert torch.equal(a, generate(unet, encoder, prompts, steps=3, seed=7, eta=1.0))
    assert not torch.allclose(a, plain, atol=1e-3)
    assert torch.allclose(generate(unet, encoder, prompts[1:], steps=3, seed=8, eta=1.0), a[1:], atol=1e-5)


def test_img2img_at_low_strength_keeps_the_image(toy):
    unet, encoder = toy
    init = torch.from_numpy(np.stack([clf.render_example(clf.CLASSES.index("design"), 1, 0)]))  # a flat design
    kept = generate(unet, encoder, ["a red circle"], steps=2, init_images=init, strength=0.02)
    fresh = generate(unet, encoder, ["a red circle"], steps=2)
    assert (kept - init).abs().mean() < 0.5 * (fresh - init).abs().mean()


# --- technique classifier ----------------------------------------------------------------------

def test_classifier_is_small_and_reads_fresh_renders():
    assert os.path.getsize(clf.WEIGHTS) <= MAX_CLASSIFIER_BYTES
    model = clf.load_classifier()
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(len(clf.CLASSES)), CLASSIFIER_TEST_PER_CLASS)
    images = np.stack([clf.render_example(int(k), EVAL_SEED + i, int(rng.integers(2 ** 31)))
                       for i, k in enumerate(labels)])
    predicted = clf.predict(model, images)
    accuracy = np.mean([p == clf.CLASSES[k] for p, k in zip(predicted, labels)])
    assert accuracy > CLASSIFIER_MIN_ACCURACY
    assert clf.technique_accuracy(model, images[labels == clf.CLASSES.index(HELD_OUT[0])], HELD_OUT[0]) > 0.5
    hits = clf.attribute_hits(["knot vertical coarse matte", "design"], "knot horizontal coarse metallic", 2)
    assert hits == [1.0, 0.0]  # spacing right; a flat design has no attributes
    assert clf.attribute_hits(["knot vertical coarse matte"], "knot horizontal coarse metallic", 3) == [0.0]


def test_the_vae_and_classifier_commands_name_the_arithmetic_they_ran_on(tmp_path):
    from toyworld import vae

    vae_file, clf_file = str(tmp_path / "vae.safetensors"), str(tmp_path / "clf.safetensors")
    assert vae.main(["--out", vae_file, "--images", "4"]) == 0
    assert clf.main(["--out", clf_file, "--steps", "1", "--threads", "1"]) == 0
    with safetensors.safe_open(vae_file, framework="pt") as f:
        assert f.metadata()["built_on"] == arithmetic()
    assert read_metadata(clf_file)["built_on"] == arithmetic()


def test_classifier_training_is_reproducible():
    config = clf.ClassifierConfig(steps=2, batch=4)
    first, second = (clf.train(config, log_every=1).state_dict() for _ in range(2))
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_partial_prompts_name_a_proper_subset_and_the_stream_is_pinned():
    import numpy as np

    from toyworld.generator import TRAIN_TECHNIQUES

    assert train_base.partial_words("knot vertical fine metallic", 0b0101) == "knot fine"
    assert train_base.partial_words("knot vertical fine metallic", 0b1010) == "vertical metallic"
    with pytest.raises(ValueError, match="proper subset"):
        train_base.partial_words("knot vertical fine metallic", 15)
    seen = set()
    rng = np.random.default_rng(0)
    for _ in range(100):
        _, prompt = train_base.training_example(rng, 0.0, partial_fraction=1.0)
        words = prompt.split(" in ")[1][: -len(" style")].split()
        assert 1 <= len(words) <= 3 and any(" ".join(w for w in t.split() if w in words) == " ".join(words)
                                            for t in TRAIN_TECHNIQUES)
        seen.add(len(words))
    assert seen == {1, 2, 3}
    # the shipped base's data stream at the defaults, as this script version drew it from seed 5
    # (recorded): a change here means the base no longer rebuilds from its command
    config = train_base.BaseTrainConfig()
    rng = np.random.default_rng(5)
    assert [train_base.training_example(rng, config.design_fraction, config.partial_fraction)[1]
            for _ in range(6)] == [
        "a green triangle red Z in metallic style", "a blue circle purple Q in horizontal fine style",
        "a orange square in horizontal metallic style", "a purple triangle in tatami vertical coarse matte style",
        "a orange star pink heart in knot horizontal coarse metallic style",
        "a pink circle in satin horizontal fine metallic style"]


def test_attribute_weights_draw_the_weighted_techniques_more_often_and_leave_the_default_alone(tmp_path, capsys):
    import numpy as np

    from toyworld.generator import TRAIN_TECHNIQUES

    p = train_base.technique_probabilities((("coarse", 2.0),))
    coarse = np.array(["coarse" in t.split() for t in TRAIN_TECHNIQUES])
    assert np.isclose(p.sum(), 1) and np.allclose(p[coarse], 2 * p[~coarse][0]) and np.allclose(p[~coarse], p[~coarse][0])
    both = train_base.technique_probabilities((("coarse", 2.0), ("cross", 3.0)))
    i = TRAIN_TECHNIQUES.index("cross horizontal coarse matte")
    j = TRAIN_TECHNIQUES.index("satin horizontal fine matte")
    assert np.isclose(both[i] / both[j], 6.0)  # the product of the words' weights
    assert np.allclose(train_base.technique_probabilities(()), 1 / len(TRAIN_TECHNIQUES))
    rng = np.random.default_rng(0)
    drawn = [train_base.training_example(rng, 0.0, 0.0, (("coarse", 3.0),))[1] for _ in range(200)]
    assert 0.65 < np.mean([" coarse " in d for d in drawn]) < 0.85  # 3 / 4 expected
    for bad, match in ((("spiky", 2.0),), "not an attribute word"), ((("coarse", 0.0),), "positive"):
        with pytest.raises(ValueError, match=match):
            train_base.technique_probabilities(bad)
    assert train_base.parse_attribute_weight("coarse=2") == ("coarse", 2.0)
    with pytest.raises(ValueError, match="WORD=WEIGHT"):
        train_base.parse_attribute_weight("coarse")
    with pytest.raises(SystemExit):
        train_base.main(["--out", str(tmp_path / "x.safetensors"), "--attribute-weight", "sparkly=2", "--steps", "1"])
    assert "not an attribute word" in capsys.readouterr().err
    # the record of a default run has no new field, so the shipped base's metadata is unchanged
    assert "attribute_weights" not in json.loads(train_base.config_json(train_base.BaseTrainConfig()))
    weighted = train_base.BaseTrainConfig(attribute_weights=(("coarse", 2.0),))
    assert json.loads(train_base.config_json(weighted))["attribute_weights"] == [["coarse", 2.0]]


def test_balanced_geometry_draws_every_kind_direction_spacing_equally_often():
    import numpy as np

    from toyworld.generator import HELD_OUT, TRAIN_TECHNIQUES

    p = train_base.technique_probabilities((), balance_geometry=True)
    geometries = sorted({train_base.geometry(t) for t in TRAIN_TECHNIQUES})
    assert len(geometries) == 16
    per_geometry = {g: p[[train_base.geometry(t) == g for t in TRAIN_TECHNIQUES]].sum() for g in geometries}
    assert np.allclose(list(per_geometry.values()), 1 / 16)
    # the lonely cells are the held-out combinations' sheen twins, drawn twice as often as the rest
    twins = {train_base.geometry(h) + (" matte" if h.endswith("metallic") else " metallic") for h in HELD_OUT}
    lonely = np.array([t in twins for t in TRAIN_TECHNIQUES])
    assert lonely.sum() == 4 and np.allclose(p[lonely], 2 / 32) and np.allclose(p[~lonely], 1 / 32)
    # it composes with word weights, and a run without it keeps the uniform draw and its record
    both = train_base.technique_probabilities((("coarse", 2.0),), balance_geometry=True)
    i, j = TRAIN_TECHNIQUES.index("cross horizontal coarse matte"), TRAIN_TECHNIQUES.index("cross horizontal fine matte")
    assert np.isclose(both[i] / both[j], 4.0)
    rng = np.random.default_rng(0)
    drawn = [train_base.training_example(rng, 0.0, 0.0, (), True)[1] for _ in range(1000)]
    lonely_share = np.mean([d.rsplit(" in ", 1)[1][:-len(" style")] in twins for d in drawn])
    assert 0.2 < lonely_share < 0.3  # 8 / 32 expected; a uniform draw gives 4 / 28
    assert "balance_geometry" not in json.loads(train_base.config_json(train_base.BaseTrainConfig()))
    assert json.loads(train_base.config_json(train_base.BaseTrainConfig(balance_geometry=True)))["balance_geometry"]


def test_img2img_examples_start_from_the_flat_design_and_are_trained_to_denoise_to_its_embroidery(tmp_path, capsys):
    from embroidery_core.diffusion import TorchDenoiser, denoised

    plain = train_base.BaseTrainConfig(batch=64, threads=1)
    rng = np.random.default_rng(3)
    batch = train_base.make_batch(rng, plain)
    assert batch.source is batch.x0 and not batch.img2img.any()  # the default: the plain objective only
    config = train_base.BaseTrainConfig(batch=64, threads=1, img2img_fraction=0.5)
    batch = train_base.make_batch(np.random.default_rng(3), config)
    rows = batch.img2img
    # about half of the 3/4 that are embroideries; none with the empty prompt
    assert 8 <= int(rows.sum()) <= 40 and UNCOND not in [p for p, r in zip(batch.prompts, rows) if r]
    assert all(" style" in p for p, r in zip(batch.prompts, rows) if r)
    assert torch.equal(batch.source[~rows], batch.x0[~rows])
    assert (batch.source[rows] - batch.x0[rows]).abs().flatten(1).amax(1).min() > 0.1  # a design, not its embroidery
    # the flat design the source holds is the one the embroidery was drawn from: its colours' latent
    # is near the embroidery's at the coarsest scale (the mean over the image) and far at the finest
    means = lambda x: x.mean(dim=(2, 3))
    assert (means(batch.source[rows]) - means(batch.x0[rows])).abs().mean() < \
        (means(batch.source[rows]) - means(batch.x0[rows].roll(1, 0))).abs().mean()
    denoiser = TorchDenoiser(torch.nn.Identity(), "v")
    g = torch.Generator().manual_seed(0)
    sigma = train_base.img2img_sigma(denoiser, 256, g, config.timestep_exponent, config.img2img_min_t)
    assert sigma.min() >= denoiser.sigmas[config.img2img_min_t] - 1e-6
    noise = torch.randn(batch.x0.shape, generator=g)
    sigma = sigma[:64]
    x_t, goal = train_base.training_pair(config, batch, noise, sigma)
    assert torch.allclose(x_t, batch.source + sigma.view(-1, 1, 1, 1) * noise)
    # the target is what the network must output for the sampler to read the embroidery back out of x_t
    assert torch.allclose(denoised("v", goal, x_t, sigma), batch.x0, atol=1e-4)
    plain_x_t, plain_goal = train_base.training_pair(plain, batch._replace(source=batch.x0), noise, sigma)
    assert torch.equal(plain_goal[~rows], goal[~rows]) and not torch.allclose(plain_goal[rows], goal[rows])
    # a run with img2img examples records them; the default's record has no new field
    assert "img2img_fraction" not in json.loads(train_base.config_json(plain))
    record = json.loads(train_base.config_json(config))
    assert record["img2img_fraction"] == 0.5 and record["img2img_min_t"] == config.img2img_min_t
    with pytest.raises(SystemExit):
        train_base.main(["--out", str(tmp_path / "x.safetensors"), "--img2img-fraction", "2", "--steps", "1"])
    assert "--img2img-fraction must be in 0..1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train_base.main(["--out", str(tmp_path / "x.safetensors"), "--img2img-fraction", "0.5",
                         "--img2img-min-t", "1000", "--steps", "1"])
    assert "--img2img-min-t must be in 1..999" in capsys.readouterr().err
    # another floor moves every img2img example's noise level above it, and is recorded
    floor = train_base.img2img_sigma(denoiser, 256, torch.Generator().manual_seed(0), config.timestep_exponent, 600)
    assert floor.min() >= denoiser.sigmas[600] - 1e-6 and floor.min() > sigma.min()
    assert json.loads(train_base.config_json(replace(config, img2img_min_t=600)))["img2img_min_t"] == 600
    path = str(tmp_path / "floor.safetensors")
    assert train_base.main(["--out", path, "--steps", "1", "--batch", "2", "--img2img-fraction", "0.5",
                            "--img2img-min-t", "600"]) == 0
    with safetensors.safe_open(path, "pt") as f:
        assert json.loads(f.metadata()["train_config"])["img2img_min_t"] == 600
