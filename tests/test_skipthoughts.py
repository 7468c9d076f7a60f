"""The uni-skip encoder against references written here from the Theano skip-thoughts GRU equations, on small
files written in the original layouts (the widths are read from the files, so they can be tiny)."""
from __future__ import annotations

import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from models.encoders.skipthoughts import UniSkipEncoder
from utils.weights import WeightsError

E, H = 4, 3  # word-vector and state widths of the small files (the originals are 620 and 2400)
DICTIONARY = ["<eos>", "UNK", "a", "plane", "is", "parked", "near", "the", "runway", "plane"]  # "plane" twice
# id 0 is padding; "<unk>" and "airport" are not in the dictionary
WORDS = ["<pad>", "a", "plane", "<unk>", "is", "parked", "near", "airport", "the", "runway"]


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def theano_params(rng: np.random.Generator, e: int = E, h: int = H, scale: float = 0.8) -> dict[str, np.ndarray]:
    """Random uni-skip encoder arrays with the original names and shape structure."""
    shapes = {"encoder_W": (e, 2 * h), "encoder_U": (h, 2 * h), "encoder_b": (2 * h,),
              "encoder_Wx": (e, h), "encoder_Ux": (h, h), "encoder_bx": (h,)}
    return {k: (scale * rng.standard_normal(s)).astype(np.float32) for k, s in shapes.items()}


class Py2Pickler(pickle._Pickler):
    """Writes bytes as Python 2 ``str`` (BINSTRING) and numpy's reconstructor under its Python 2 module name,
    as the original utable.npy was written."""

    dispatch = pickle._Pickler.dispatch.copy()

    def save_py2_str(self, obj: bytes) -> None:
        self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)

    dispatch[bytes] = save_py2_str

    def save_global(self, obj: object, name: str | None = None) -> None:
        if obj is np.ndarray((0,)).__reduce__()[0]:
            self.write(pickle.GLOBAL + b"numpy.core.multiarray\n_reconstruct\n")
            self.memoize(obj)
        else:
            super().save_global(obj, name)


def write_object_table(path: Path, rows: list[np.ndarray], pickler: type = Py2Pickler) -> None:
    """utable.npy as the original: a .npy header for a 1-D object array, then a protocol-2 pickle of it."""
    table = np.empty(len(rows), dtype=object)
    table[:] = rows
    with open(path, "wb") as handle:
        np.lib.format.write_array_header_1_0(handle, {"descr": "|O", "fortran_order": False, "shape": (len(rows),)})
        pickler(handle, protocol=2).dump(table)


def write_original(folder: Path, params: dict[str, np.ndarray], table: np.ndarray,
                   dictionary: list[str] = DICTIONARY) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    np.savez(folder / "uni_skip.npz", **params, Wemb=np.zeros((2, 2), np.float32))  # plus an unused array
    write_object_table(folder / "utable.npy", list(table))
    (folder / "dictionary.txt").write_text("".join(f"{w}\n" for w in dictionary), encoding="utf-8")
    return folder


@pytest.fixture
def original(tmp_path: Path) -> tuple[Path, dict[str, np.ndarray], np.ndarray]:
    rng = np.random.default_rng(0)
    params = theano_params(rng)
    table = rng.standard_normal((len(DICTIONARY), E)).astype(np.float32)
    return write_original(tmp_path / "st", params, table), params, table


def loaded(folder: Path, words: list[str] = WORDS, **kwargs) -> UniSkipEncoder:
    encoder = UniSkipEncoder(words, embed_dim=E, hidden_dim=H, **kwargs)
    encoder.load_original(folder)
    return encoder.double().eval()


def theano_reference(params: dict[str, np.ndarray], x: np.ndarray, lengths: list[int],
                     input_masks: np.ndarray | None = None, hidden_masks: np.ndarray | None = None) -> np.ndarray:
    """The skip-thoughts encoder step, one time step at a time: preact = h U + x W + b, reset and update are
    its two halves, the candidate is tanh((h Ux) * reset + x Wx + bx), h = u h + (1 - u) candidate, and a
    step past a caption's end keeps its state (Theano's mask). Optional dropout masks [3, B, width] for the
    (reset, update, candidate) gates multiply x and h before each gate's product, the same at every step."""
    p = {k: v.astype(np.float64) for k, v in params.items()}
    h_dim = p["encoder_Ux"].shape[0]
    batch, steps = x.shape[:2]
    ones_x, ones_h = np.ones((3, batch, x.shape[2])), np.ones((3, batch, h_dim))
    mx = ones_x if input_masks is None else input_masks
    mh = ones_h if hidden_masks is None else hidden_masks
    w_r, w_u = p["encoder_W"][:, :h_dim], p["encoder_W"][:, h_dim:]
    u_r, u_u = p["encoder_U"][:, :h_dim], p["encoder_U"][:, h_dim:]
    b_r, b_u = p["encoder_b"][:h_dim], p["encoder_b"][h_dim:]
    h = np.zeros((batch, h_dim))
    for t in range(steps):
        xt = x[:, t]
        reset = sigmoid((h * mh[0]) @ u_r + (xt * mx[0]) @ w_r + b_r)
        update = sigmoid((h * mh[1]) @ u_u + (xt * mx[1]) @ w_u + b_u)
        candidate = np.tanh(((h * mh[2]) @ p["encoder_Ux"]) * reset + (xt * mx[2]) @ p["encoder_Wx"] + p["encoder_bx"])
        stepped = update * h + (1.0 - update) * candidate
        active = (t < np.asarray(lengths))[:, None]
        h = np.where(active, stepped, h)
    return h


def table_inputs(table: np.ndarray, ids: torch.Tensor, words: list[str] = WORDS) -> np.ndarray:
    """The word vectors of ``ids`` as the port maps them: the dictionary row (the last, for a repeated word),
    else the UNK row; padding is zero."""
    index = {w: i for i, w in enumerate(DICTIONARY)}
    rows = np.zeros((len(words), table.shape[1]))
    for k, word in enumerate(words[1:], start=1):
        rows[k] = table[index.get(word, index["UNK"])]
    return rows[ids.numpy()]


BATCH = torch.tensor([[1, 2, 4, 5, 6, 8, 9], [1, 2, 3, 0, 0, 0, 0], [7, 0, 0, 0, 0, 0, 0], [9, 8, 2, 2, 1, 0, 0]])
LENGTHS = torch.tensor([7, 3, 1, 5])


def test_loaded_weights_reproduce_the_theano_gru(original):
    folder, params, table = original
    encoder = loaded(folder)
    with torch.no_grad():
        out = encoder(BATCH, LENGTHS)
    expected = theano_reference(params, table_inputs(table, BATCH), LENGTHS.tolist())
    assert out.shape == (4, H)
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-10, atol=1e-12)


def test_the_weights_land_in_torch_gate_order(original):
    folder, params, _ = original
    gru = loaded(folder).gru
    np.testing.assert_array_equal(gru.weight_ih_l0[:H].detach().numpy(), params["encoder_W"][:, :H].T)  # reset
    np.testing.assert_array_equal(gru.weight_hh_l0[H:2 * H].detach().numpy(), params["encoder_U"][:, H:].T)  # update
    np.testing.assert_array_equal(gru.weight_ih_l0[2 * H:].detach().numpy(), params["encoder_Wx"].T)  # candidate
    np.testing.assert_array_equal(gru.bias_ih_l0[2 * H:].detach().numpy(), params["encoder_bx"])
    assert not gru.bias_hh_l0.any() and not gru.bias_hh_l0.requires_grad


def test_words_get_their_rows_and_unknown_ones_the_unk_row(original, caplog):
    folder, _, table = original
    encoder = UniSkipEncoder(WORDS, embed_dim=E, hidden_dim=H)
    report = encoder.load_original(folder)
    weight = encoder.embedding.weight.detach().numpy()
    assert not weight[0].any()  # padding
    np.testing.assert_array_equal(weight[1], table[DICTIONARY.index("a")])
    np.testing.assert_array_equal(weight[2], table[9])  # "plane" is listed twice: its last line wins
    np.testing.assert_array_equal(weight[9], table[DICTIONARY.index("runway")])
    for unknown in (3, 7):
        np.testing.assert_array_equal(weight[unknown], table[DICTIONARY.index("UNK")])
    assert report.vocabulary == 9 and report.unknown == ["<unk>", "airport"]
    assert "7/9 vocabulary words found" in str(report) and "2 not found" in str(report)
    assert "'airport'" in caplog.text


def test_the_report_shows_the_first_unknown_words(original):
    folder, _, _ = original
    words = ["<pad>"] + [f"w{i}" for i in range(25)]
    report = UniSkipEncoder(words, embed_dim=E, hidden_dim=H).load_original(folder)
    assert len(report.unknown) == 25
    assert "25 not found" in str(report) and "'w9'" in str(report) and "'w10'" not in str(report)
    assert str(report).endswith("...")


def test_a_resaved_float_table_loads_the_same(original, tmp_path):
    folder, _, table = original
    np.save(folder / "utable.npy", table)  # a plain 2-D array instead of the pickled object array
    again = loaded(folder)
    write_object_table(folder / "utable.npy", list(table[:, None, :]))  # rows stored as [1, E]
    rows_2d = loaded(folder)
    expected = table_inputs(table, torch.arange(len(WORDS)))
    np.testing.assert_array_equal(again.embedding.weight.detach().numpy(), expected)
    np.testing.assert_array_equal(rows_2d.embedding.weight.detach().numpy(), expected)


def test_the_written_table_is_what_numpy_reads_from_the_original(tmp_path):
    """The test's writer makes what the port reads with numpy.load(allow_pickle=True, encoding='latin1')."""
    rows = [np.arange(E, dtype=np.float32) + i for i in range(3)]
    write_object_table(tmp_path / "utable.npy", rows)
    assert b"numpy.core.multiarray\n_reconstruct" in (tmp_path / "utable.npy").read_bytes()
    read = np.load(tmp_path / "utable.npy", allow_pickle=True, encoding="latin1")
    assert read.dtype == object and all(np.array_equal(a, b) for a, b in zip(read, rows))


def test_padding_never_changes_a_caption(original):
    encoder = loaded(original[0])
    caption = torch.tensor([[1, 2, 4, 5]])
    with torch.no_grad():
        alone = encoder(caption, torch.tensor([4]))
        batch = torch.tensor([[9, 8, 7, 6, 5, 4, 3, 2], [1, 2, 4, 5, 0, 0, 0, 0], [1, 2, 4, 5, 9, 9, 9, 9]])
        padded = encoder(batch, torch.tensor([8, 4, 4]))  # the third carries real words past its end
    torch.testing.assert_close(padded[1:], alone.expand(2, H), rtol=1e-12, atol=1e-12)


def test_eval_has_no_dropout(original):
    folder, params, table = original
    encoder = loaded(folder, dropout=0.5)
    with torch.no_grad():
        first, second = encoder(BATCH, LENGTHS), encoder(BATCH, LENGTHS)
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    expected = theano_reference(params, table_inputs(table, BATCH), LENGTHS.tolist())
    np.testing.assert_allclose(first.numpy(), expected, rtol=1e-10, atol=1e-12)


def test_training_without_dropout_is_the_plain_gru(original):
    encoder = loaded(original[0], dropout=0.0)
    with torch.no_grad():
        evaluated = encoder(BATCH, LENGTHS)
        trained = encoder.train()(BATCH, LENGTHS)
    torch.testing.assert_close(trained, evaluated, rtol=0, atol=0)


def record_masks(encoder: UniSkipEncoder, replace: str | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Wraps the mask sampler to keep what it drew (or to draw all-ones masks, with replace='ones')."""
    drawn, sample = [], encoder._sample_masks

    def recording(batch: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        masks = sample(batch, like)
        masks = tuple(torch.ones_like(m) for m in masks) if replace == "ones" else masks
        drawn.append(masks)
        return masks

    encoder._sample_masks = recording
    return drawn


def test_the_dropout_loop_with_all_ones_masks_is_nn_gru(original):
    encoder = loaded(original[0], dropout=0.5)
    with torch.no_grad():
        evaluated = encoder(BATCH, LENGTHS)
        record_masks(encoder, replace="ones")
        looped = encoder.train()(BATCH, LENGTHS)
    torch.testing.assert_close(looped, evaluated, rtol=1e-12, atol=1e-12)


def test_training_applies_one_mask_per_gate_for_the_whole_caption(original):
    """The loop, given the masks it drew, equals the Theano step with those masks held at every time step."""
    folder, params, table = original
    encoder = loaded(folder, dropout=0.5).train()
    drawn = record_masks(encoder)
    with torch.no_grad():
        out = encoder(BATCH, LENGTHS)
    (input_masks, hidden_masks), = drawn
    assert input_masks.shape == (3, 4, E) and hidden_masks.shape == (3, 4, H)
    expected = theano_reference(params, table_inputs(table, BATCH), LENGTHS.tolist(),
                                input_masks.numpy(), hidden_masks.numpy())
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-10, atol=1e-12)


RESET_BIAS, HIDDEN_BIAS, HIDDEN_GAIN = 2.0, 0.25, 1.5  # exact in float32


def diagonal_original(folder: Path, width: int, *, input_path: bool) -> Path:
    """Files for a GRU made of independent scalar GRUs, one per coordinate, with constant gates (reset
    sigmoid(RESET_BIAS), update 0.5): the candidate is tanh(x) on the input path, or
    tanh(HIDDEN_BIAS + reset * HIDDEN_GAIN * h) on the hidden path."""
    zeros, eye = np.zeros((width, width)), np.eye(width)
    params = {"encoder_W": np.zeros((width, 2 * width)), "encoder_U": np.zeros((width, 2 * width)),
              "encoder_b": np.r_[np.full(width, RESET_BIAS), np.zeros(width)],
              "encoder_Wx": eye if input_path else zeros, "encoder_Ux": zeros if input_path else HIDDEN_GAIN * eye,
              "encoder_bx": np.zeros(width) if input_path else np.full(width, HIDDEN_BIAS)}
    table = np.tile(diagonal_inputs(width), (len(DICTIONARY), 1))
    return write_original(folder, {k: v.astype(np.float32) for k, v in params.items()}, table)


def diagonal_inputs(width: int) -> np.ndarray:
    return np.linspace(0.2, 1.0, width, dtype=np.float32)


def scalar_gru(candidate, steps: int, update: float = 0.5) -> float:
    h = 0.0
    for _ in range(steps):
        h = update * h + (1 - update) * candidate(h)
    return h


@pytest.mark.parametrize("input_path", [True, False], ids=["input-masks", "hidden-masks"])
def test_a_dropped_unit_stays_dropped_for_the_whole_caption(tmp_path, input_path):
    """Seen from outside: every output coordinate is the state of a scalar GRU whose mask was 0 at every step
    or 1/keep at every step. A mask drawn anew at each step would mix the two and land in between."""
    width, steps, p = 64, 6, 0.5
    encoder = UniSkipEncoder(WORDS, dropout=p, embed_dim=width, hidden_dim=width)
    encoder.load_original(diagonal_original(tmp_path / "diag", width, input_path=input_path))
    encoder.double().train()
    torch.manual_seed(0)
    with torch.no_grad():
        out = encoder(torch.full((8, steps), 1), torch.full((8,), steps)).numpy()
    x, reset = diagonal_inputs(width).astype(np.float64), sigmoid(RESET_BIAS)
    outcomes = []
    for mask in (0.0, 1 / (1 - p)):
        if input_path:
            outcomes.append([scalar_gru(lambda h, xj=xj: np.tanh(mask * xj), steps) for xj in x])
        else:
            outcomes.append([scalar_gru(lambda h: np.tanh(HIDDEN_BIAS + reset * HIDDEN_GAIN * mask * h), steps)])
    dropped, kept = (np.broadcast_to(np.asarray(o), out.shape) for o in outcomes)
    is_dropped, is_kept = np.isclose(out, dropped, rtol=0, atol=1e-12), np.isclose(out, kept, rtol=0, atol=1e-12)
    assert (is_dropped | is_kept).all()
    assert 0.3 < is_dropped.mean() < 0.7  # both occur, about p of the time
    assert (is_kept.any(axis=1) & is_dropped.any(axis=1)).all()  # per caption, not per batch


def test_masks_differ_between_captions_and_calls(original):
    encoder = loaded(original[0], dropout=0.25).train()
    drawn = record_masks(encoder)
    same = torch.tensor([[1, 2, 4, 5, 6]] * 6)
    with torch.no_grad():
        first = encoder(same, torch.full((6,), 5))
        second = encoder(same, torch.full((6,), 5))
    assert len({tuple(row.tolist()) for row in first}) > 1
    assert not torch.equal(first, second)
    values = torch.cat([m.flatten() for pair in drawn for m in pair])
    assert set(values.unique().tolist()) <= {0.0, 1 / 0.75}


def test_gradients_reach_the_gru_and_respect_fixed_emb(original):
    folder = original[0]
    for fixed in (False, True):
        encoder = UniSkipEncoder(WORDS, dropout=0.25, fixed_emb=fixed, embed_dim=E, hidden_dim=H)
        encoder.load_original(folder)
        encoder.train()(BATCH, LENGTHS).sum().backward()
        assert encoder.gru.weight_hh_l0.grad.abs().sum() > 0
        assert encoder.gru.bias_hh_l0.grad is None
        if fixed:
            assert encoder.embedding.weight.grad is None
        else:
            assert not encoder.embedding.weight.grad[0].any() and encoder.embedding.weight.grad[1].any()


def test_the_default_widths_are_the_original_ones():
    encoder = UniSkipEncoder(["<pad>", "a"])
    assert encoder.embedding.weight.shape == (2, 620) and encoder.gru.hidden_size == 2400


def test_lengths_are_checked(original):
    encoder = loaded(original[0])
    with pytest.raises(ValueError, match="1..7"):
        encoder(BATCH, torch.tensor([7, 3, 0, 5]))
    with pytest.raises(ValueError, match="1..7"):
        encoder(BATCH, torch.tensor([8, 3, 1, 5]))
    with pytest.raises(ValueError, match="lengths"):
        encoder(BATCH, LENGTHS[:2])


@pytest.mark.parametrize("name", ["uni_skip.npz", "utable.npy", "dictionary.txt"])
def test_a_missing_file_is_named(original, name):
    folder = original[0]
    (folder / name).unlink()
    with pytest.raises(WeightsError, match=f"not found: .*{name}"):
        UniSkipEncoder(WORDS, embed_dim=E, hidden_dim=H).load_original(folder)


def test_missing_npz_keys_are_named(original):
    folder, params, _ = original
    np.savez(folder / "uni_skip.npz", **{k: v for k, v in params.items() if k not in ("encoder_Ux", "encoder_b")})
    with pytest.raises(WeightsError, match=r"uni_skip\.npz lacks encoder_b, encoder_Ux"):
        UniSkipEncoder(WORDS, embed_dim=E, hidden_dim=H).load_original(folder)


def test_widths_that_do_not_fit_are_named(original):
    folder, params, _ = original
    with pytest.raises(WeightsError, match=r"uni_skip\.npz: encoder_W \(4, 6\) \(expected \(620, 4800\)\).*2400"):
        UniSkipEncoder(WORDS).load_original(folder)
    np.savez(folder / "uni_skip.npz", **{**params, "encoder_Ux": np.zeros((H, H + 1), np.float32)})
    with pytest.raises(WeightsError, match=r"uni_skip\.npz: encoder_Ux \(3, 4\) \(expected \(3, 3\)\)"):
        UniSkipEncoder(WORDS, embed_dim=E, hidden_dim=H).load_original(folder)


def test_a_table_of_another_width_is_named(original):
    folder, _, table = original
    write_object_table(folder / "utable.npy", list(np.zeros((len(DICTIONARY), E + 1), np.float32)))
    with pytest.raises(WeightsError, match=r"utable\.npy: row \d+ is float32 \(5,\); this encoder's embed_dim is 4"):
        UniSkipEncoder(WORDS, embed_dim=E, hidden_dim=H).load_original(folder)
    np.save(folder / "utable.npy", np.zeros((len(DICTIONARY), E + 1), np.float32))
    with pytest.raises(WeightsError, match=r"utable\.npy has 5-d word vectors"):
        UniSkipEncoder(WORDS, embed_dim=E, hidden_dim=H).load_original(folder)


def test_table_rows_and_dictionary_lines_must_agree(original):
    folder = original[0]
    (folder / "dictionary.txt").write_text("".join(f"{w}\n" for w in DICTIONARY + ["extra"]))
    with pytest.raises(WeightsError, match=r"utable\.npy has 10 rows but .*dictionary\.txt has 11 lines"):
        UniSkipEncoder(WORDS, embed_dim=E, hidden_dim=H).load_original(folder)


def test_a_dictionary_without_unk_is_named_when_a_word_needs_it(original):
    folder, _, _ = original
    (folder / "dictionary.txt").write_text("".join(f"{w}\n" for w in ["<eos>", "UNK_"] + DICTIONARY[2:]))
    with pytest.raises(WeightsError, match=r"dictionary\.txt has no 'UNK' line.*'<unk>', 'airport'"):
        UniSkipEncoder(WORDS, embed_dim=E, hidden_dim=H).load_original(folder)
    UniSkipEncoder(["<pad>", "a", "runway"], embed_dim=E, hidden_dim=H).load_original(folder)  # no word needs it


class Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


def test_a_table_pickle_that_would_run_code_is_refused(original, tmp_path):
    folder = original[0]
    marker = tmp_path / "ran"
    write_object_table(folder / "utable.npy", [Payload(marker)] * len(DICTIONARY), pickler=pickle.Pickler)
    with pytest.raises(WeightsError, match=r"utable\.npy cannot be read.*refusing"):
        UniSkipEncoder(WORDS, embed_dim=E, hidden_dim=H).load_original(folder)
    assert not marker.exists()


def test_files_that_are_not_arrays_are_named(original):
    folder = original[0]
    (folder / "uni_skip.npz").write_bytes(b"not an archive")
    with pytest.raises(WeightsError, match=r"uni_skip\.npz cannot be read"):
        UniSkipEncoder(WORDS, embed_dim=E, hidden_dim=H).load_original(folder)


def test_a_failed_load_leaves_the_weights_alone(original):
    folder = original[0]
    encoder = UniSkipEncoder(WORDS, embed_dim=E, hidden_dim=H)
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    (folder / "dictionary.txt").write_text("a\n")
    with pytest.raises(WeightsError):
        encoder.load_original(folder)
    assert all(torch.equal(before[k], v) for k, v in encoder.state_dict().items())
