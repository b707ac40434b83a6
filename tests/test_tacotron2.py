"""Tacotron2: NVIDIA's text front end, state-dict layout and outputs; checkpoint loading and its safety."""

from __future__ import annotations

import builtins
import dataclasses
import json
import pickle
import warnings
from pathlib import Path

import pytest
import torch

from tacotron2 import (
    Tacotron2,
    Tacotron2Config,
    load_tacotron2,
    save_tacotron2,
    sequence_to_text,
    symbols,
    text_to_sequence,
)
from tacotron2.text import cardinal, english_cleaners, normalize_numbers, ordinal, transliteration_cleaners
from utils import UserError

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
FIXTURES = SHARED / "fixtures"

# Small enough that a teacher-forced pass over a few dozen frames takes milliseconds.
TINY = dict(symbols_embedding_dim=16, encoder_embedding_dim=16, decoder_rnn_dim=24, prenet_dim=8,
            attention_rnn_dim=24, attention_dim=8, attention_location_n_filters=4, attention_location_kernel_size=7,
            postnet_embedding_dim=12, n_mel_channels=8, max_decoder_steps=20)


def tiny_model(**overrides) -> Tacotron2:
    torch.manual_seed(0)
    return Tacotron2(Tacotron2Config(**{**TINY, **overrides}))


def fixture_json() -> dict:
    path = FIXTURES / "nvidia_tacotron2.json"
    if not path.is_file():
        pytest.skip(f"needs the shared fixtures ({path} is absent)")
    return json.loads(path.read_text())


# ---------------------------------------------------------------------------------------------
# Text front end
# ---------------------------------------------------------------------------------------------

def test_symbol_table_matches_nvidia_shared_fixture():
    assert symbols == fixture_json()["symbols"]
    assert len(symbols) == 148


def test_text_to_sequence_matches_nvidia_shared_fixture():
    for text, expected in fixture_json()["english_cleaners_text_to_sequence"].items():
        sequence = text_to_sequence(text, ("english_cleaners",))
        assert sequence == expected, text
        # Decoding gives the cleaned text, and cleaning that again changes nothing.
        assert sequence_to_text(sequence) == english_cleaners(text)
        assert text_to_sequence(sequence_to_text(sequence)) == expected


@pytest.mark.parametrize("n, words", [
    (0, "zero"), (7, "seven"), (15, "fifteen"), (40, "forty"), (42, "forty-two"), (100, "one hundred"),
    (101, "one hundred one"), (999, "nine hundred ninety-nine"), (1000, "one thousand"),
    (1001, "one thousand one"), (1100, "one thousand, one hundred"), (3005, "three thousand five"),
    (3456, "three thousand, four hundred fifty-six"), (1_000_010, "one million ten"),
    (2_001_000, "two million, one thousand"),
    (1_234_567, "one million, two hundred thirty-four thousand, five hundred sixty-seven"),
])
def test_cardinal_numbers_read_like_inflect(n, words):
    assert cardinal(n) == words


def test_ordinals_keep_inflects_and():
    assert ordinal(1) == "first" and ordinal(2) == "second" and ordinal(3) == "third"
    assert ordinal(12) == "twelfth" and ordinal(20) == "twentieth" and ordinal(21) == "twenty-first"
    assert ordinal(101) == "one hundred and first"
    assert ordinal(1_000_000) == "one millionth"


@pytest.mark.parametrize("text, spoken", [
    ("1999", "nineteen ninety-nine"), ("1905", "nineteen oh five"), ("2000", "two thousand"),
    ("2005", "two thousand five"), ("2010", "twenty ten"), ("1600", "sixteen hundred"),
    ("3000", "three thousand"), ("5th", "fifth"), ("the 21st", "the twenty-first"),
    ("3.14", "three point fourteen"), ("31,234", "thirty-one thousand, two hundred thirty-four"),
    ("$3.50", "three dollars, fifty cents"), ("$1", "one dollar"), ("$0.01", "one cent"),
    ("$0", "zero dollars"), ("$1,000.99", "one thousand dollars, ninety-nine cents"),
    ("£5", "five pounds"), ("10" * 20, " ".join(["one", "zero"] * 20)),  # beyond decillions: digit by digit
])
def test_number_normalisation(text, spoken):
    assert normalize_numbers(text) == spoken


def test_english_cleaners_abbreviations_case_ascii_and_whitespace():
    assert english_cleaners("Dr. Jones met Mrs. Smith and Mr. Lee on St. James St.") == \
        "doctor jones met misess smith and mister lee on saint james saint"
    assert english_cleaners("Capt. Sgt. Lt. Col. Maj. Gen. Rev. Hon. Esq. Ltd. Co. Jr. Drs. Ft.") == (
        "captain sergeant lieutenant colonel major general reverend honorable esquire limited company "
        "junior doctors fort")
    assert english_cleaners("Jan. stays") == "jan. stays"  # not in NVIDIA's list
    assert english_cleaners("  Café\tnaïve —  “Ha”\n") == " cafe naive -- \"ha\" "
    assert english_cleaners("Straße Ærø") == "strasse aero"


def test_other_scripts_are_transliterated_like_nvidias_front_end():
    """NVIDIA's convert_to_ascii is unidecode: Cyrillic, Greek and CJK become Latin letters, not nothing."""
    assert transliteration_cleaners("Привет, Ελλάδα! Café Zürich 東京") == "privet, ellada! cafe zurich dong jing "
    assert sequence_to_text(text_to_sequence("a日本b")) == "ari ben b"
    assert english_cleaners("It costs £5.") == "it costs five pounds."  # '£' still reaches the pound rule


def test_unknown_characters_are_dropped_not_fatal():
    assert sequence_to_text(text_to_sequence("a#bc<d>e%_f")) == "abcdef"
    assert text_to_sequence("") == []
    with pytest.raises(UserError, match="unknown text cleaner"):
        text_to_sequence("hi", ("klingon_cleaners",))


def test_arpabet_in_braces_passes_through_and_round_trips():
    sequence = text_to_sequence("Say {HH AH0 L OW1}, 2 times.")
    phonemes = [symbols.index(f"@{p}") for p in ("HH", "AH0", "L", "OW1")]
    start = len(text_to_sequence("say "))
    assert sequence[start:start + 4] == phonemes
    assert sequence_to_text(sequence) == "say {HH AH0 L OW1}, two times."
    assert text_to_sequence(sequence_to_text(sequence)) == sequence
    # Adjacent groups merge; a phoneme not in CMUdict's set is dropped.
    assert sequence_to_text(text_to_sequence("{HH AH0}{L OW1 XX}")) == "{HH AH0 L OW1}"
    assert 0 not in text_to_sequence("no _ pad")  # the pad id only ever fills batches


# ---------------------------------------------------------------------------------------------
# Model layout and parity with NVIDIA's outputs
# ---------------------------------------------------------------------------------------------

def test_default_state_dict_matches_published_checkpoint_layout_shared_fixture():
    expected = fixture_json()["default_state_dict_shapes"]
    model = Tacotron2()
    state = model.state_dict()
    assert list(state) == list(expected)
    assert {k: list(v.shape) for k, v in state.items()} == expected
    n_params = sum(torch.Size(shape).numel() for key, shape in expected.items()
                   if not key.endswith(("running_mean", "running_var", "num_batches_tracked")))
    assert model.num_parameters() == n_params == 28_193_153


def test_outputs_match_nvidia_small_model_shared_fixture():
    config = Tacotron2Config(**fixture_json()["small_config"])
    io = torch.load(FIXTURES / "nvidia_tacotron2_small_io.pt", map_location="cpu", weights_only=True)
    model = load_tacotron2(FIXTURES / "nvidia_tacotron2_small.pt", config)
    assert not model.training
    with torch.no_grad():
        encoded = model.encode(io["tokens"])
        packed = model.encode(io["tokens"], torch.tensor([io["tokens"].size(1)]))
        residual = model.postnet(io["postnet_input"])
    torch.testing.assert_close(encoded, io["encoder_outputs"], atol=1e-4, rtol=0)
    torch.testing.assert_close(packed, io["encoder_outputs"], atol=1e-4, rtol=0)
    torch.testing.assert_close(residual, io["postnet_output"], atol=1e-4, rtol=0)
    # Without a config, the architecture is read off the tensor shapes.
    inferred = load_tacotron2(FIXTURES / "nvidia_tacotron2_small.pt")
    assert inferred.config == config


def test_teacher_forced_forward_keeps_frame_count_and_masks_padding():
    model = tiny_model(prenet_dropout=0.0).eval()  # deterministic, so a row alone can be compared
    text = torch.randint(1, 148, (3, 11))
    text_lengths = torch.tensor([11, 7, 4])
    for row, length in enumerate(text_lengths):
        text[row, length:] = 0
    mels = torch.randn(3, 8, 17)
    output_lengths = torch.tensor([17, 12, 5])
    with torch.no_grad():
        mel, mel_postnet, gate, alignments = model(text, text_lengths, mels, output_lengths)
    assert mel.shape == mel_postnet.shape == (3, 8, 17)
    assert gate.shape == (3, 17) and alignments.shape == (3, 17, 11)
    for row, (n_text, n_frames) in enumerate(zip(text_lengths.tolist(), output_lengths.tolist())):
        assert (mel[row, :, n_frames:] == 0).all() and (mel_postnet[row, :, n_frames:] == 0).all()
        assert (gate[row, n_frames:] == 1e3).all() and (gate[row, :n_frames] != 1e3).all()
        assert (alignments[row, :, n_text:] == 0).all()  # attention never looks at padded text
        torch.testing.assert_close(alignments[row].sum(-1), torch.ones(17))
    # A row's real frames do not depend on how far its mel is padded (the post-net aside: its
    # receptive field reaches into the padding).
    with torch.no_grad():
        cropped = model(text[1:2], text_lengths[1:2], mels[1:2, :, :12], output_lengths[1:2])
    torch.testing.assert_close(mel[1:2, :, :12], cropped[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(gate[1:2, :12], cropped[2], atol=1e-5, rtol=0)
    torch.testing.assert_close(alignments[1:2, :12], cropped[3], atol=1e-5, rtol=0)


def test_forward_backward_trains():
    model = tiny_model().train()
    text, mels = torch.randint(1, 148, (2, 6)), torch.randn(2, 8, 9)
    mel, mel_postnet, gate, _ = model(text, torch.tensor([6, 6]), mels, torch.tensor([9, 9]))
    loss = (mel - mels).pow(2).mean() + (mel_postnet - mels).pow(2).mean() + gate.sigmoid().mean()
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_infer_stops_at_the_cap_with_a_warning():
    model = tiny_model(max_decoder_steps=9).eval()
    with torch.no_grad():
        model.decoder.gate_layer.linear_layer.bias.fill_(-30.0)  # the stop token never fires
    with pytest.warns(RuntimeWarning, match="max_decoder_steps"):
        mel, mel_postnet, gate, alignments = model.infer(text_to_sequence("hello there"))
    assert mel.shape == mel_postnet.shape == (1, 8, 9)
    assert gate.shape == (1, 9) and alignments.shape == (1, 9, len(text_to_sequence("hello there")))
    with pytest.warns(RuntimeWarning):
        assert model.infer(torch.tensor([[40, 41]]), max_decoder_steps=3)[0].shape[-1] == 3


def test_infer_stops_when_the_gate_fires():
    model = tiny_model().eval()
    with torch.no_grad():
        model.decoder.gate_layer.linear_layer.weight.zero_()
        model.decoder.gate_layer.linear_layer.bias.fill_(30.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mel, *_ = model.infer([40, 41, 42])
    assert mel.shape == (1, 8, 1)


def never_stopping(**overrides) -> Tacotron2:
    """A tiny model in eval mode whose stop token never fires, so that infer runs to max_decoder_steps."""
    model = tiny_model(**overrides).eval()
    with torch.no_grad():
        model.decoder.gate_layer.linear_layer.bias.fill_(-30.0)
    return model


def test_infer_takes_text_through_the_english_front_end():
    model = never_stopping(max_decoder_steps=4)
    text = "Dr. Smith paid $5."
    tokens = text_to_sequence(text)  # english_cleaners: "doctor smith paid five dollars."
    outputs = {}
    with pytest.warns(RuntimeWarning, match="max_decoder_steps"):
        for name, given in (("text", text), ("ids", tokens), ("tensor", torch.tensor([tokens]))):
            torch.manual_seed(3)  # the prenet's dropout is random: same seed, same masks
            outputs[name] = model.infer(given)
    assert outputs["text"][3].shape == (1, 4, len(tokens))  # attention over the cleaned text's symbols
    for name in ("ids", "tensor"):
        for a, b in zip(outputs["text"], outputs[name]):
            assert torch.equal(a, b), name
    # Other cleaners on request; text with nothing speakable is the user's error, said plainly.
    with pytest.warns(RuntimeWarning):
        alignments = model.infer(text, cleaners=("basic_cleaners",))[3]
    assert alignments.shape[2] == len(text_to_sequence(text, ("basic_cleaners",))) != len(tokens)
    with pytest.raises(UserError, match="has no symbol"):
        model.infer("#%&<>")


def test_prenet_dropout_stays_on_in_eval_mode():
    """NVIDIA's behaviour (and the paper's): the prenet drops out at inference too, so after eval() the seed still
    matters for the teacher-forced decoder and for infer, and only through the prenet."""
    text, mels = torch.randint(1, 148, (1, 6)), torch.randn(1, 8, 7)

    def decode(model: Tacotron2, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        torch.manual_seed(seed)
        with torch.no_grad():
            teacher_forced = model(text, torch.tensor([6]), mels)[1]
        torch.manual_seed(seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # it runs to max_decoder_steps on purpose
            inferred = model.infer(text, max_decoder_steps=6)[1]
        return teacher_forced, inferred

    model = never_stopping()
    assert not model.training and not model.decoder.prenet.training
    first, again, other = decode(model, 1), decode(model, 1), decode(model, 2)
    for a, b, c in zip(first, again, other):
        assert torch.equal(a, b)  # same seed: identical
        assert not torch.allclose(a, c)  # another seed: other prenet masks, other mels
    # With the prenet's dropout at 0, eval mode is deterministic: the encoder, attention, decoder and post-net
    # dropouts are off, as usual.
    model = never_stopping(prenet_dropout=0.0)
    for a, c in zip(decode(model, 1), decode(model, 2)):
        assert torch.equal(a, c)


# ---------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------

def assert_same_weights(a: Tacotron2, b: Tacotron2) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for key in sa:
        torch.testing.assert_close(sa[key], sb[key], atol=0, rtol=0)


def test_repo_layout_round_trip(tmp_path):
    model = tiny_model(gate_threshold=0.3)
    weights = save_tacotron2(model, tmp_path / "taco", extra={"audio": {"sampling_rate": 22050}})
    assert weights == tmp_path / "taco" / "tacotron2.safetensors"
    assert sorted(p.name for p in weights.parent.iterdir()) == ["config.json", "tacotron2.safetensors"]
    named = save_tacotron2(model, tmp_path / "other" / "best.safetensors")
    for path in (weights.parent, weights, named):
        loaded = load_tacotron2(path)
        assert loaded.config == model.config and not loaded.training
        assert_same_weights(model, loaded)
    assert json.loads((weights.parent / "config.json").read_text())["audio"] == {"sampling_rate": 22050}


def test_nvidia_layout_with_dataparallel_prefix_infers_config(tmp_path):
    model = tiny_model(encoder_n_convolutions=2, postnet_n_convolutions=3, postnet_kernel_size=3)
    state = {"module." + k: v for k, v in model.state_dict().items()}
    torch.save({"state_dict": state, "iteration": 12, "learning_rate": 1e-3,
                "optimizer": {"state": {}, "param_groups": [{"lr": 1e-3}]}}, tmp_path / "checkpoint_12")
    loaded = load_tacotron2(tmp_path / "checkpoint_12")
    # The file has no max_decoder_steps (not a tensor shape): NVIDIA's default is used.
    assert loaded.config == dataclasses.replace(model.config, max_decoder_steps=1000)
    assert_same_weights(model, loaded)


class _WritesAFile:
    """Unpickling this would run `exec` and create a file."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self):
        return builtins.exec, (f"open({str(self.target)!r}, 'w').write('pwned')",)


def test_malicious_pickle_is_refused_and_never_runs(tmp_path):
    target = tmp_path / "pwned.txt"
    bad = tmp_path / "tacotron2_statedict.pt"
    torch.save({"state_dict": tiny_model().state_dict(), "payload": _WritesAFile(target)}, bad)
    with pytest.raises(UserError, match="refused: loading it would import and call exec") as excinfo:
        load_tacotron2(bad)
    assert str(bad) in str(excinfo.value)
    raw = tmp_path / "raw.pkl"  # a plain pickle (not torch's zip format) with the same payload
    raw.write_bytes(pickle.dumps({"state_dict": _WritesAFile(target)}, protocol=2))
    with pytest.raises(UserError, match="refused"):
        load_tacotron2(raw)
    assert not target.exists()
    # The file is genuinely dangerous: an unrestricted load does run the payload.
    torch.load(bad, weights_only=False)
    assert target.read_text() == "pwned"


def test_file_of_neither_layout_names_the_keys_it_found(tmp_path):
    path = tmp_path / "g_00000100"
    torch.save({"generator": {"conv_pre.weight": torch.zeros(1)}, "steps": 100}, path)
    with pytest.raises(UserError, match="not a Tacotron2 checkpoint") as excinfo:
        load_tacotron2(path)
    assert "'generator'" in str(excinfo.value) and "'steps'" in str(excinfo.value)
    torch.save([torch.zeros(1)], path)
    with pytest.raises(UserError, match="holds a list"):
        load_tacotron2(path)
    path.write_bytes(b"not a checkpoint at all")
    with pytest.raises(UserError, match="not a PyTorch checkpoint"):
        load_tacotron2(path)
    with pytest.raises(UserError, match="no such file"):
        load_tacotron2(tmp_path / "missing.pt")


def test_explicit_config_mismatch_names_the_first_tensor(tmp_path):
    path = tmp_path / "nvidia.pt"
    torch.save({"state_dict": tiny_model().state_dict(), "iteration": 0, "learning_rate": 1e-3}, path)
    wrong = Tacotron2Config(**{**TINY, "prenet_dim": 10, "postnet_embedding_dim": 20})
    with pytest.raises(UserError, match=r"decoder\.prenet\.layers\.0\.linear_layer\.weight has shape \[8, 8\]"):
        load_tacotron2(path, wrong)
    with pytest.raises(UserError, match="missing tensors"):
        load_tacotron2(path, {**TINY, "encoder_n_convolutions": 4})


def test_config_serialisation_and_validation():
    config = Tacotron2Config(**TINY)
    assert Tacotron2Config.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    with pytest.raises(UserError, match="unknown Tacotron2 config keys: sampling_rate"):
        Tacotron2Config.from_dict({"sampling_rate": 22050})
    with pytest.raises(UserError, match="n_frames_per_step"):
        Tacotron2Config(n_frames_per_step=2)
