"""The Hourglass encoder (utils/hourglass.py): the same frames as the standard encoder, factor 1 is
the standard encoder, padding never reaches a real frame, saved models load with and without our
code; and pretrain.py, finetune_ctc.py, extract_features.py and transcribe.py with it."""

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from helpers import REPO, flags, log_rows, run_script, write_signal
from transformers import (
    Wav2Vec2Config,
    Wav2Vec2FeatureExtractor,
    Wav2Vec2ForCTC,
    Wav2Vec2ForPreTraining,
    Wav2Vec2Model,
)

from utils.audio import conv_frames, conv_geometry
from utils.hourglass import (
    HourglassWav2Vec2Config,
    HourglassWav2Vec2ForCTC,
    HourglassWav2Vec2ForPreTraining,
    HourglassWav2Vec2Model,
    model_class,
    parse_hourglass,
    read_config,
    shorten,
)
from utils.objective import MaskAndNegatives
from utils.pretrain_arguments import apply_config_overrides, split_overrides

TINY_HOURGLASS = REPO / "configs" / "tiny-wav2vec2-hourglass"


def pair(hourglass: str, **overrides):
    """A standard and an hourglass tiny model with the same weights, in eval mode."""
    config = read_config(TINY_HOURGLASS, hourglass=hourglass, **overrides)
    plain = Wav2Vec2Config(**{k: v for k, v in config.to_dict().items() if k not in ("model_type", "auto_map")})
    torch.manual_seed(0)
    standard = Wav2Vec2Model(plain).eval()
    hourglass_model = HourglassWav2Vec2Model(HourglassWav2Vec2Config(**config.to_dict())).eval()
    assert not hourglass_model.load_state_dict(standard.state_dict()).missing_keys
    return standard, hourglass_model


def samples_for(frames: int) -> int:
    return 400 + (frames - 1) * 320


# --------------------------------------------------------------------------------------------- the config


def test_spec_parsing_and_layer_count():
    assert parse_hourglass("[2,(8,4),2]") == (2, 8, 4, 2) == parse_hourglass(" [2, (8, 4), 2] ")
    assert HourglassWav2Vec2Config(hourglass="[2, (8, 4), 2]").hourglass == "[2,(8,4),2]"
    for bad in ("[2,(8,4)]", "2,8,4,2", "[0,(8,4),4]", "[2,(8,0),2]", "[2,(8,4.5),2]", "import os"):
        with pytest.raises(ValueError, match="hourglass"):
            parse_hourglass(bad)
    with pytest.raises(ValueError, match="has 14 layers but num_hidden_layers is 12"):
        HourglassWav2Vec2Config(hourglass="[2,(8,4),4]")


def test_config_overrides_make_and_unmake_an_hourglass_config():
    assert split_overrides("hourglass=[2,(8,4),2], layerdrop=0.05,,") == ["hourglass=[2,(8,4),2]", "layerdrop=0.05"]
    config = apply_config_overrides(
        read_config(REPO / "configs" / "wav2vec2-base"), "hourglass=[2,(8,4),2],layerdrop=0.05"
    )
    assert type(config) is HourglassWav2Vec2Config and config.hourglass == "[2,(8,4),2]"
    assert config.layerdrop == 0.05 and config.hidden_size == 768 and config.model_type == "hourglass_wav2vec2"
    standard = apply_config_overrides(config, "hourglass=null")
    assert type(standard) is Wav2Vec2Config and not hasattr(standard, "hourglass") and standard.layerdrop == 0.05
    plain = apply_config_overrides(read_config(REPO / "configs" / "wav2vec2-base"), "hourglass=null")
    assert type(plain) is Wav2Vec2Config and not hasattr(plain, "hourglass")
    with pytest.raises(SystemExit, match="--config_overrides: hourglass .* has 4 layers but num_hidden_layers is 2"):
        apply_config_overrides(read_config(REPO / "configs" / "tiny-wav2vec2-base"), "hourglass=[1,(2,4),1]")
    tiny = apply_config_overrides(
        read_config(REPO / "configs" / "tiny-wav2vec2-base"), "hourglass=[1,(2,4),1],num_hidden_layers=4"
    )
    assert model_class(tiny, Wav2Vec2ForPreTraining) is HourglassWav2Vec2ForPreTraining
    assert model_class(standard, Wav2Vec2ForPreTraining) is Wav2Vec2ForPreTraining


def test_the_scratch_recipe_is_nvidias_base_recipe():
    from utils.pretrain_arguments import DataArguments, ModelArguments, ObjectiveArguments
    from utils.training import TrainingArguments, parse_args_with_recipe

    model, data, objective, training = parse_args_with_recipe(
        [ModelArguments, DataArguments, ObjectiveArguments, TrainingArguments],
        [str(REPO / "configs" / "recipes" / "hourglass-base-scratch.yaml")],
    )
    config = apply_config_overrides(read_config(model.config_name), model.config_overrides)
    assert parse_hourglass(config.hourglass) == (2, 8, 4, 2) and config.num_hidden_layers == 12
    assert (config.layerdrop, config.feat_proj_dropout, config.feat_quantizer_dropout) == (0.05, 0.1, 0.1)
    assert (training.learning_rate, training.warmup_steps, training.max_train_steps) == (5e-4, 32000, 400000)
    assert (training.max_grad_norm, model.feature_grad_mult, objective.feature_penalty_weight) == (25.0, 0.1, 10.0)
    assert (objective.mask_time_prob, objective.min_gumbel_temperature) == (0.65, 0.5)
    assert (data.crop_seconds * training.per_device_train_batch_size, training.gradient_accumulation_steps) == (90, 8)


# --------------------------------------------------------------------------------------------- the encoder


def test_pooling_is_the_mean_of_the_real_frames_only():
    states = torch.arange(2 * 7 * 1, dtype=torch.float32).view(2, 7, 1)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0, 0]])
    pooled, pooled_mask = shorten(states, mask, 3)
    # row 0: (0,1,2) (3,4,5) (6 + tail padding); row 1: (7,8,9) (10,11 + padded 12) (padded 13 + tail)
    assert pooled[..., 0].tolist() == [[1.0, 4.0, 6.0], [8.0, 10.5, 0.0]]
    assert pooled_mask.tolist() == [[True, True, True], [True, True, False]]
    states[1, 5:] = float("nan")  # whatever a padded frame holds never reaches a real one
    assert torch.equal(shorten(states, mask, 3)[0][1, :2], pooled[1, :2])
    assert shorten(states[:1], None, 3)[1] is None


@pytest.mark.parametrize("frames", [1, 48, 99])
def test_shapes_and_frame_counts_are_the_standard_encoders(frames):
    standard, hourglass = pair("[1,(2,4),1]")
    inputs = torch.randn(2, samples_for(frames))
    with torch.no_grad():
        a, b = standard(inputs, output_hidden_states=True), hourglass(inputs, output_hidden_states=True)
    assert b.last_hidden_state.shape == a.last_hidden_state.shape == (2, frames, 32)
    assert b.extract_features.shape == a.extract_features.shape
    assert [h.shape for h in b.hidden_states] == [h.shape for h in a.hidden_states] == [(2, frames, 32)] * 5
    config = hourglass.config
    assert conv_frames(inputs.shape[1], *conv_geometry(config)) == frames
    with torch.no_grad():
        pretraining = HourglassWav2Vec2ForPreTraining(config).eval()
        ctc = HourglassWav2Vec2ForCTC(config).eval()
        assert pretraining(inputs).projected_states.shape == (2, frames, config.proj_codevector_dim)
        assert ctc(inputs).logits.shape == (2, frames, config.vocab_size)


def test_shortened_layers_hidden_states_repeat_their_frames_and_the_rest_do_not():
    _, hourglass = pair("[1,(2,4),1]")
    with torch.no_grad():
        states = hourglass(torch.randn(1, samples_for(50)), output_hidden_states=True).hidden_states
    for index, state in enumerate(states):
        grouped = state[0, :48].view(12, 4, -1)
        repeated = bool((grouped == grouped[:, :1]).all()) and torch.equal(
            state[0, 48:], state[0, 48:49].expand(2, -1)
        )
        assert repeated == (index in (2, 3)), index  # hidden states 2 and 3: the outputs of the shortened layers


@pytest.mark.parametrize("stable_layer_norm", [False, True])
def test_factor_one_is_the_standard_encoder_exactly(stable_layer_norm):
    overrides = dict(do_stable_layer_norm=True, feat_extract_norm="layer") if stable_layer_norm else {}
    standard, hourglass = pair("[1,(2,1),1]", **overrides)
    inputs = torch.randn(2, 24000)
    with torch.no_grad():
        a, b = standard(inputs, output_hidden_states=True), hourglass(inputs, output_hidden_states=True)
    assert torch.equal(a.last_hidden_state, b.last_hidden_state)
    assert all(torch.equal(x, y) for x, y in zip(a.hidden_states, b.hidden_states, strict=True))
    # and the pretraining loss, through the same masks and negatives
    plain_config, config = standard.config, hourglass.config
    standard_head, hourglass_head = (
        Wav2Vec2ForPreTraining(plain_config).eval(),
        HourglassWav2Vec2ForPreTraining(config),
    )
    hourglass_head.load_state_dict(standard_head.state_dict())
    frames = conv_frames(24000, *conv_geometry(config))
    batch = MaskAndNegatives(frames, 0.5, 5, 10)({"crop_keys": np.array([[0, 0, 0], [0, 0, 1]])})
    kwargs = {k: torch.from_numpy(batch[k]) for k in ("mask_time_indices", "sampled_negative_indices")}
    with torch.no_grad():
        assert torch.equal(standard_head(inputs, **kwargs).loss, hourglass_head.eval()(inputs, **kwargs).loss)


@pytest.mark.parametrize("stable_layer_norm", [False, True])
def test_padding_never_changes_the_real_frames(stable_layer_norm):
    """Layer-norm conv features take an attention mask; 98 frames leave a partial group of 2 of 4
    whose pooled frame must not see the padding after it."""
    _, hourglass = pair("[1,(2,4),1]", feat_extract_norm="layer", do_stable_layer_norm=stable_layer_norm)
    torch.manual_seed(1)
    alone = torch.randn(1, samples_for(98))
    batch = torch.randn(2, samples_for(130))  # padding of noise, not zeros: anything leaking shows
    batch[0, : alone.shape[1]] = alone[0]
    mask = torch.ones(2, batch.shape[1], dtype=torch.long)
    mask[0, alone.shape[1] :] = 0
    with torch.no_grad():
        single = hourglass(alone, output_hidden_states=True)
        padded = hourglass(batch, attention_mask=mask, output_hidden_states=True)
    assert padded.last_hidden_state.shape[1] == 130
    for one, many in zip(
        single.hidden_states + (single.last_hidden_state,), padded.hidden_states + (padded.last_hidden_state,)
    ):
        assert (one[0] - many[0, :98]).abs().max() < 1e-5


def test_a_stack_cut_short_gives_the_same_hidden_states():
    """extract_features.py drops the layers above the highest one it saves."""
    _, hourglass = pair("[1,(2,4),1]")
    inputs = torch.randn(1, samples_for(60))
    with torch.no_grad():
        full = hourglass(inputs, output_hidden_states=True).hidden_states
        for keep in (3, 2, 1):
            del hourglass.encoder.layers[keep:]
            cut = hourglass(inputs, output_hidden_states=True).hidden_states
            assert len(cut) == keep + 1 and torch.equal(cut[keep], full[keep])


def test_gradient_checkpointing_gives_the_same_gradients():
    # Nothing random in the forward pass: no dropout, LayerDrop or SpecAugment.
    config = read_config(
        TINY_HOURGLASS,
        layerdrop=0.0,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        activation_dropout=0.0,
        mask_time_prob=0.0,
    )
    inputs = torch.randn(2, samples_for(40))
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = HourglassWav2Vec2Model(config).train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model(inputs).last_hidden_state.square().sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.encoder.parameters()]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


# --------------------------------------------------------------------------------------------- saving and loading

LOAD_ELSEWHERE = """
import sys, numpy as np, torch
from transformers import AutoModel, AutoModelForCTC, AutoModelForPreTraining
folder, inputs = sys.argv[1], torch.from_numpy(np.load(sys.argv[2]))
assert "utils" not in sys.modules
try:
    AutoModel.from_pretrained(folder)
    print("loaded without trust_remote_code")
except ValueError as error:
    print("refused:", "trust_remote_code" in str(error))
model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
with torch.no_grad():
    out = model(inputs, output_hidden_states=True)
np.save(sys.argv[3], torch.stack(out.hidden_states).numpy())
for auto in (AutoModelForPreTraining, AutoModelForCTC):
    print(type(auto.from_pretrained(folder, trust_remote_code=True)).__name__)
print(type(model).__name__, type(model.encoder).__name__)
"""


@pytest.mark.slow
def test_save_load_round_trip_with_our_code_and_with_trust_remote_code(tmp_path):
    folder = tmp_path / "model"
    torch.manual_seed(0)
    model = HourglassWav2Vec2ForPreTraining(read_config(TINY_HOURGLASS)).eval()
    model.save_pretrained(folder)
    saved = json.loads((folder / "config.json").read_text())
    assert saved["model_type"] == "hourglass_wav2vec2" and saved["hourglass"] == "[1,(2,4),1]"
    assert saved["auto_map"]["AutoModel"] == "hourglass.HourglassWav2Vec2Model"
    assert (folder / "hourglass.py").read_text() == (REPO / "utils" / "hourglass.py").read_text()
    inputs = torch.randn(2, samples_for(45))
    with torch.no_grad():
        reference = torch.stack(model.wav2vec2(inputs, output_hidden_states=True).hidden_states)
        for head in (Wav2Vec2Model, Wav2Vec2ForPreTraining, Wav2Vec2ForCTC):
            loaded = model_class(read_config(folder), head).from_pretrained(folder).eval()
            encoder = loaded if head is Wav2Vec2Model else loaded.wav2vec2
            assert torch.equal(torch.stack(encoder(inputs, output_hidden_states=True).hidden_states), reference)
    np.save(tmp_path / "inputs.npy", inputs.numpy())
    script = tmp_path / "load_elsewhere.py"
    script.write_text(LOAD_ELSEWHERE)
    result = subprocess.run(
        [sys.executable, script, folder, tmp_path / "inputs.npy", tmp_path / "out.npy"],
        cwd=tmp_path,  # not the repo: only the folder's own hourglass.py can build the model
        env={"HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules"), "PATH": "/usr/bin:/bin"},
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert "refused: True" in result.stdout  # after transformers' question whether to run the folder's code
    assert lines[-3:] == [
        "HourglassWav2Vec2ForPreTraining",
        "HourglassWav2Vec2ForCTC",
        "HourglassWav2Vec2Model HourglassWav2Vec2Encoder",
    ]
    assert np.array_equal(np.load(tmp_path / "out.npy"), reference.numpy())


# --------------------------------------------------------------------------------------------- the scripts


@pytest.fixture(scope="module")
def pretrained_hourglass(tmp_path_factory):
    """pretrain.py from scratch: the tiny base config made an hourglass by --config_overrides."""
    from test_pretrain import learnable_corpus

    corpus = learnable_corpus(tmp_path_factory.mktemp("learnable"), files=5, seconds=30)
    output_dir = tmp_path_factory.mktemp("hourglass") / "run"
    run_script(
        "pretrain.py",
        *flags(
            config_name=REPO / "configs" / "tiny-wav2vec2-base",
            config_overrides="hourglass=[1,(2,2),1],num_hidden_layers=4,layerdrop=0.0",
            train_manifest=corpus / "train.tsv",
            dev_manifest=corpus / "dev.tsv",
            output_dir=output_dir,
            crop_seconds=1.0,
            epoch_multiplier=20,
            per_device_train_batch_size=8,
            num_negatives=20,
            # The demo recipe's settings (configs/recipes/demo-tiny.yaml): a tiny model from scratch
            # gets below chance within a few dozen steps.
            learning_rate=5e-3,
            mask_time_prob=0.5,
            feature_penalty_weight=0.001,
            warmup_steps=10,
            max_train_steps=80,
            logging_steps=20,
            eval_steps=80,
            save_steps=0,
            gumbel_temperature_decay=0.99,
            dev_crops_per_file=16,
            num_workers=0,
            report_to="none",
        ),
    )
    return output_dir, corpus


@pytest.mark.slow
def test_pretraining_an_hourglass_from_scratch_lowers_the_loss(pretrained_hourglass):
    output_dir, _ = pretrained_hourglass
    rows = log_rows(output_dir)
    train = [r["loss"] for r in rows if "loss" in r]
    dev = [r["dev_loss"] for r in rows if "dev_loss" in r]
    assert len(train) == 4 and len(dev) == 2
    chance = math.log(21)  # the true frame among 20 negatives, guessed uniformly
    assert dev[0] > chance - 0.1 and dev[-1] < chance - 0.1  # measured: 3.10 -> 2.66
    assert dev[-1] < dev[0] - 0.2 and train[-1] < train[0] - 0.1
    config = json.loads((output_dir / "config.json").read_text())
    assert (config["model_type"], config["hourglass"], config["num_hidden_layers"]) == (
        "hourglass_wav2vec2",
        "[1,(2,2),1]",
        4,
    )
    assert (output_dir / "hourglass.py").is_file()
    assert "trust_remote_code=True" in (output_dir / "README.md").read_text()


@pytest.mark.slow
def test_extracted_hidden_states_are_on_the_50_hz_grid(pretrained_hourglass, tmp_path):
    output_dir, _ = pretrained_hourglass
    audio = (0.1 * np.random.default_rng(0).standard_normal(samples_for(101))).astype(np.float32)
    write_signal(tmp_path / "a.wav", audio, 16000, subtype="FLOAT")
    run_script(
        "extract_features.py",
        *flags(model_name_or_path=output_dir, output_dir=tmp_path / "f", layers="all", num_workers=0),
        tmp_path / "a.wav",
    )
    features = np.load(tmp_path / "f" / "a.npy")
    assert features.shape == (5, 101, 32)
    (row,) = [line.split("\t") for line in (tmp_path / "f" / "index.tsv").read_text().splitlines()[1:]]
    header = (tmp_path / "f" / "index.tsv").read_text().splitlines()[0].split("\t")
    assert float(dict(zip(header, row))["frame_rate"]) == 50.0
    model = HourglassWav2Vec2Model.from_pretrained(output_dir).eval()
    inputs = Wav2Vec2FeatureExtractor.from_pretrained(output_dir)(audio, sampling_rate=16000, return_tensors="pt")
    inputs = inputs.input_values  # normalised as extract_features.py normalises a file that fits one window
    with torch.no_grad():
        reference = torch.stack(model(inputs, output_hidden_states=True).hidden_states)[:, 0]
    assert np.abs(features - reference.numpy()).max() < 1e-4
    assert np.array_equal(features[2, 0:100:2], features[2, 1:101:2])  # a shortened layer: pairs of frames


@pytest.mark.slow
def test_fine_tuning_and_transcribing_with_an_hourglass(pretrained_hourglass, tmp_path):
    from data.make_demo_corpus import make_labelled_set

    output_dir, _ = pretrained_hourglass
    make_labelled_set(tmp_path / "labelled", num_utterances=60, seed=0)
    ctc_dir = tmp_path / "ctc"
    run_script(
        "finetune_ctc.py",
        *flags(
            model_name_or_path=output_dir,
            train_manifest=tmp_path / "labelled" / "train.tsv",
            dev_manifest=tmp_path / "labelled" / "dev.tsv",
            output_dir=ctc_dir,
            max_train_steps=6,
            warmup_steps=1,
            per_device_train_batch_size=4,
            eval_steps=6,
            save_steps=0,
            logging_steps=3,
            num_workers=0,
            report_to="none",
        ),
    )
    model = model_class(read_config(ctc_dir), Wav2Vec2ForCTC).from_pretrained(ctc_dir)
    assert type(model) is HourglassWav2Vec2ForCTC and (ctc_dir / "hourglass.py").is_file()
    assert json.loads((ctc_dir / "config.json").read_text())["hourglass"] == "[1,(2,2),1]"
    results = json.loads((ctc_dir / "eval_results.json").read_text())
    assert 0 <= results["wer"] and results["cer"] <= 1.5
    wav = sorted((tmp_path / "labelled" / "audio").glob("*.wav"))[0]
    result = run_script("transcribe.py", "--model_name_or_path", ctc_dir, wav)
    assert result.stdout.startswith(f"{wav}\t")
