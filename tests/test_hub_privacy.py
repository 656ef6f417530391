"""--push_to_hub publishes nothing that identifies participants or the machine (a private repo by
default, no local paths, manifest paths or participant ids, no dev transcripts), and model cards the
Hub reads well (base_model carried through local folders, language, license and datasets)."""

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from helpers import chirp, flags, write_signal
from transformers import Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2ForPreTraining

import finetune_ctc
import pretrain

PARTICIPANT = "Kid48"  # every participant id here starts with it; nothing else does


class FakeHub:
    """Stands in for huggingface_hub.HfApi: records the repo settings and every uploaded file's bytes."""

    repos: dict = {}
    commits: list = []
    existing_public: set = set()

    def __init__(self, *args, **kwargs):
        pass

    def create_repo(self, repo_id, private=None, exist_ok=False, **kwargs):
        self.repos.setdefault(repo_id, {"private": bool(private) and repo_id not in self.existing_public})

    def repo_info(self, repo_id, **kwargs):
        return type("Info", (), self.repos[repo_id])()

    def create_commit(self, repo_id, operations, commit_message="", **kwargs):
        files = {}
        for op in operations:
            source = op.path_or_fileobj
            files[op.path_in_repo] = source if isinstance(source, bytes) else Path(source).read_bytes()
        self.commits.append((repo_id, files))

    def upload_folder(self, folder_path, repo_id, **kwargs):  # the old push: every file but a few patterns
        files = {str(p.relative_to(folder_path)): p.read_bytes() for p in Path(folder_path).rglob("*") if p.is_file()}
        self.commits.append((repo_id, files))


@pytest.fixture
def hub(monkeypatch):
    import huggingface_hub

    FakeHub.repos, FakeHub.commits, FakeHub.existing_public = {}, [], set()
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHub)
    return FakeHub


def snapshot_of_hub_model(root: Path, config_dir: Path) -> Path:
    """A pretraining checkpoint where the Hub cache keeps facebook/wav2vec2-base (an offline server)."""
    folder = root / "hub" / "models--facebook--wav2vec2-base" / "snapshots" / "0123abc"
    torch.manual_seed(0)
    Wav2Vec2ForPreTraining(Wav2Vec2Config.from_pretrained(config_dir)).save_pretrained(folder)
    Wav2Vec2FeatureExtractor.from_pretrained(config_dir).save_pretrained(folder)
    return folder


def labelled_set(root: Path) -> Path:
    """The demo's labelled set with participant ids Kid48S01... in the manifests and the file names."""
    from data.make_demo_corpus import make_labelled_set

    make_labelled_set(root, num_utterances=36, seed=0)
    rows = []
    for line in (root / "train.tsv").read_text().splitlines()[1:] + (root / "dev.tsv").read_text().splitlines()[1:]:
        path, text, participant, start, end = line.split("\t")
        renamed = Path(path).with_name(f"{PARTICIPANT}{participant}_{Path(path).name}")
        if (root / path).exists():
            os.replace(root / path, root / renamed)
        rows.append("\t".join([str(renamed), text, PARTICIPANT + participant, start, end]))
    (root / "all.tsv").write_text("path\ttext\tparticipant\tstart\tend\n" + "\n".join(rows) + "\n")
    return root / "all.tsv"


def private_texts(*paths) -> set[str]:
    """A local path in every form a file could hold it: as given, absolute, and its folder (below /x)."""
    forms = {PARTICIPANT}
    for path in map(Path, paths):
        forms |= {str(path), str(path.resolve())} | ({str(path.resolve().parent)} if len(path.parts) > 3 else set())
    return forms


def assert_nothing_private(files: dict[str, bytes], forms: set[str]):
    for name, content in files.items():
        if name.endswith(".safetensors"):  # weights: only the header holds text
            content = content[: 8 + int.from_bytes(content[:8], "little")]
        for text in forms:
            assert text.encode() not in content, (name, text)


@pytest.mark.slow
def test_pushes_hold_no_local_path_participant_or_dev_transcript_and_name_their_lineage(hub, tmp_path, tiny_base_dir):
    """pretrain.py from a Hub snapshot, then finetune_ctc.py from its output folder, both pushed."""
    from huggingface_hub import ModelCard

    audio = tmp_path / "recordings"
    for index in range(4):
        write_signal(audio / f"{PARTICIPANT}P{index}_day.wav", chirp(6, 16000, seed=index), 16000)
    start, pretrained, ctc = snapshot_of_hub_model(tmp_path, tiny_base_dir), tmp_path / "pre", tmp_path / "ctc"
    card_flags = flags(push_to_hub=True, language="hi", license="cc-by-4.0", dataset_tags="lab/home-recordings")
    pretrain.main(
        flags(model_name_or_path=start, audio_dir=audio, output_dir=pretrained, crop_seconds=1.0, dev_fraction=0.25)
        + flags(per_device_train_batch_size=2, num_negatives=5, max_train_steps=2, save_steps=1, num_workers=0)
        + card_flags  # TensorBoard on (the default): its hparams.yml holds every flag
    )
    manifest = labelled_set(tmp_path / "labelled")
    finetune_ctc.main(
        flags(model_name_or_path=pretrained, train_manifest=manifest, dev_fraction=0.2, output_dir=ctc)
        + flags(max_train_steps=2, per_device_train_batch_size=4, eval_steps=1, save_steps=1, num_workers=0)
        + card_flags
        + ["--hub_model_id", "lab/home-ctc"]
    )
    (pre_repo, pre_files), (ctc_repo, ctc_files) = hub.commits
    assert (pre_repo, ctc_repo) == ("pre", "lab/home-ctc") and all(r["private"] for r in hub.repos.values())
    assert sorted(pre_files) == [
        "README.md",
        "config.json",
        "loss_curve.png",
        "model.safetensors",
        "preprocessor_config.json",
        "train_log.jsonl",
    ]
    assert {"README.md", "eval_results.json", "vocab.json", "train_log.jsonl", "model.safetensors"} <= set(ctc_files)
    assert not {"training_args.json", "unreadable_files.txt"} & set(ctc_files) and "/" not in "".join(ctc_files)
    forms = private_texts(tmp_path, audio, manifest, pretrained, ctc, start, Path.home())
    assert_nothing_private(pre_files, forms)
    assert_nothing_private(ctc_files, forms)
    # The dev examples stay in the local log only.
    assert (
        b'"examples"' in (ctc / "train_log.jsonl").read_bytes() and b'"examples"' not in ctc_files["train_log.jsonl"]
    )
    assert (ctc / "manifests" / "dev.tsv").is_file() and (ctc / "finetune_ctc").is_dir()  # local, not pushed

    pre_card, ctc_card = ModelCard(pre_files["README.md"].decode()), ModelCard(ctc_files["README.md"].decode())
    for card in (pre_card, ctc_card):
        assert card.data.base_model == "facebook/wav2vec2-base"  # carried through the local folder
        assert (card.data.language, card.data.license, card.data.datasets) == (
            ["hi"],
            "cc-by-4.0",
            ["lab/home-recordings"],
        )
    assert "| Base model | pre (a local model, from facebook/wav2vec2-base) |" in ctc_card.text
    result = ctc_card.data.eval_results[0]
    assert (result.dataset_type, result.dataset_name) == ("local", "dev set (all.tsv)")
    assert 'from_pretrained("lab/home-ctc")' in ctc_card.text


def test_push_is_private_unless_asked_and_never_into_a_public_repo(hub, tmp_path, caplog):
    from utils.cards import push_folder_to_hub
    from utils.training import TrainingArguments, parse_args_with_recipe

    (tmp_path / "README.md").write_text("---\nlibrary_name: transformers\n---\n# a model\n")
    (tmp_path / "training_args.json").write_text(json.dumps({"training": {"output_dir": str(tmp_path)}}))
    assert push_folder_to_hub(tmp_path, "lab/a") and hub.repos["lab/a"] == {"private": True}
    assert push_folder_to_hub(tmp_path, "lab/b", private=False) and hub.repos["lab/b"] == {"private": False}
    hub.existing_public.add("lab/c")
    assert not push_folder_to_hub(tmp_path, "lab/c")
    assert "lab/c exists and is public" in caplog.text and [repo for repo, _ in hub.commits] == ["lab/a", "lab/b"]
    assert [[name for name in files] for _, files in hub.commits] == [["README.md"]] * 2

    (train_args,) = parse_args_with_recipe([TrainingArguments], [])
    (public,) = parse_args_with_recipe([TrainingArguments], ["--hub_private_repo", "false"])
    assert (train_args.hub_private_repo, public.hub_private_repo) == (True, False)


def test_a_file_that_would_publish_a_local_path_stops_the_push(hub, tmp_path, caplog):
    from utils.cards import push_folder_to_hub

    out = tmp_path / "run"
    out.mkdir()
    manifest = tmp_path / "data" / "train.tsv"
    manifest.parent.mkdir()
    manifest.write_text("path\ttext\n")
    (out / "training_args.json").write_text(json.dumps({"data": {"train_manifest": str(manifest)}}))
    (out / "README.md").write_text(f"trained on {manifest.parent}/train.tsv\n")
    assert not push_folder_to_hub(out, "lab/run") and not hub.commits
    assert f"README.md: {manifest}" in caplog.text


def test_eval_results_count_the_unreadable_files_and_name_them_locally(tmp_path):
    from utils.ctc_card import eval_results, write_eval_results

    unreadable = {f"/data/{PARTICIPANT}A/day1.wav", f"/data/{PARTICIPANT}B/day2.wav"}
    results = eval_results(None, 10, {"dev_set": "none"}, unreadable)
    write_eval_results(tmp_path, results, unreadable)
    assert json.loads((tmp_path / "eval_results.json").read_text())["unreadable_files_skipped"] == 2
    assert PARTICIPANT not in (tmp_path / "eval_results.json").read_text()
    assert (tmp_path / "unreadable_files.txt").read_text().splitlines() == sorted(unreadable)


def test_card_metadata_names_data_and_base_models_never_their_paths(tmp_path, monkeypatch):
    from utils.cards import base_model_of, card_header
    from utils.ctc_arguments import DataArguments
    from utils.ctc_card import hub_model_index
    from utils.training import TrainingArguments

    dataset = tmp_path / "corpora" / "home-asr"
    dataset.mkdir(parents=True)
    results = {"wer": 0.25, "cer": 0.125}
    local = hub_model_index(results, DataArguments(dataset_name=str(dataset)), str(tmp_path / "out"))
    assert str(tmp_path) not in local and '"type": "local", "name": "home-asr"' in local
    hub_data = hub_model_index(results, DataArguments(dataset_name="lab/home-asr"), "out")
    assert '"type": "lab/home-asr", "name": "lab/home-asr"' in hub_data

    continued = tmp_path / "runs" / "home"
    continued.mkdir(parents=True)
    (continued / "README.md").write_text("---\nbase_model: facebook/wav2vec2-base\n---\n# continued\n")
    assert base_model_of(str(continued)) == (
        "facebook/wav2vec2-base",
        "home (a local model, from facebook/wav2vec2-base)",
    )
    monkeypatch.chdir(tmp_path)
    assert base_model_of("runs/home")[0] == "facebook/wav2vec2-base"
    shutil.copytree(continued, tmp_path / "scratch")
    (tmp_path / "scratch" / "README.md").write_text("---\nlibrary_name: transformers\n---\n")
    assert base_model_of(str(tmp_path / "scratch")) == ("", "scratch (a local model)")
    assert base_model_of("facebook/wav2vec2-large-robust") == ("facebook/wav2vec2-large-robust",) * 2
    assert base_model_of(f"random init from {tmp_path}/configs/tiny") == ("", "random init (config tiny)")

    header = card_header(TrainingArguments(language="hi,en", dataset_tags="a/b, c"), "facebook/wav2vec2-base", ["x"])
    assert "license" not in header  # none given: none stated
    assert "language: [hi, en]" in header and "datasets: [a/b, c]" in header
    assert "license: mit" in card_header(TrainingArguments(license="mit"), "", ["x"])


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--language", "Hindi"], "--language 'Hindi': expected ISO 639 codes"),
        (["--license", "Apache 2"], "--license 'Apache 2'"),
        (["--dataset_tags", "/data/home"], "--dataset_tags '/data/home'"),
    ],
)
def test_card_flags_are_checked_at_start(argv, message, capsys):
    from utils.training import TrainingArguments, parse_args_with_recipe

    with pytest.raises(SystemExit):
        parse_args_with_recipe([TrainingArguments], argv)
    assert message in capsys.readouterr().err
