"""The skip-thoughts uni-skip sentence encoder (Kiros et al., 2015), loaded from the original Theano-era files.

AMFMN encodes captions with it through the ``skipthoughts`` PyTorch port (``BayesianUniSkip``): word vectors
from ``utable.npy`` (its rows follow the lines of ``dictionary.txt``) feed a GRU whose weights are in
``uni_skip.npz``, and a caption's vector is the GRU state after its last real token. The original files give
620-d word vectors and a 2,400-d state; the widths are arguments so that small files in the same layout work.
"""
from __future__ import annotations

import codecs
import logging
import pickle
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

from utils.weights import Remapped, StateDict, WeightsError

log = logging.getLogger(__name__)

GRU_FILE = "uni_skip.npz"
TABLE_FILE = "utable.npy"
DICTIONARY_FILE = "dictionary.txt"
UNKNOWN_WORD = "UNK"  # the dictionary line whose vector the port gives to words the dictionary lacks
SHOWN_UNKNOWN = 10


@dataclass
class UniSkipLoadReport:
    """What ``load_original`` did with the vocabulary: the words ``dictionary.txt`` lacks, for the log."""

    folder: Path
    vocabulary: int  # words looked up: every id but the padding id 0
    unknown: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        text = (f"skip-thoughts uni-skip from {self.folder}: {self.vocabulary - len(self.unknown)}/"
                f"{self.vocabulary} vocabulary words found in {DICTIONARY_FILE}")
        if not self.unknown:
            return text
        more = " ..." if len(self.unknown) > SHOWN_UNKNOWN else ""
        shown = ", ".join(map(repr, self.unknown[:SHOWN_UNKNOWN]))
        return f"{text}; {len(self.unknown)} not found, given the {UNKNOWN_WORD!r} vector: {shown}{more}"

    def log(self) -> None:
        (log.warning if self.unknown else log.info)("%s", self)


class UniSkipEncoder(nn.Module):
    """Caption ids [B, L] and lengths [B] -> the uni-skip GRU state after each caption's last token [B, hidden_dim].

    ``words[k]`` is the vocabulary word of id ``k``; id 0 is padding (its vector is zero and gets no gradient),
    so ``words[0]`` is never looked up. The port takes the vocabulary without the padding entry and shifts ids
    by one; ``[pad] + port_vocabulary`` here gives the same id-to-word mapping.

    Parameters: ``embedding.weight`` is the port's ``embedding.weight``; ``gru.*`` is a ``torch.nn.GRU`` where
    the port has separate gate layers ``rnn.gru_cell.weight_{ir,ii,in}.{weight,bias}`` (input; ``ii`` is the
    update gate) and ``rnn.gru_cell.weight_{hr,hi,hn}.weight`` (hidden): ``gru.weight_ih_l0`` stacks the three
    input weights in that order, ``gru.weight_hh_l0`` the hidden ones and ``gru.bias_ih_l0`` the biases.
    Skip-thoughts has no hidden-side bias, so ``gru.bias_hh_l0`` stays zero and frozen: only then is torch's
    candidate ``tanh(W_in x + b_in + r * (W_hn h + b_hn))`` the Theano ``tanh(x Wx + bx + r * (h Ux))``.

    ``dropout`` is the port's Bayesian (variational) dropout, applied in training only; ``fixed_emb`` freezes the
    word vectors, as the port's flag does.
    """

    def __init__(self, words: Sequence[str], dropout: float = 0.25, fixed_emb: bool = False, *,
                 embed_dim: int = 620, hidden_dim: int = 2400) -> None:
        super().__init__()
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must lie in [0, 1), got {dropout}")
        if not words:
            raise ValueError("words needs at least the padding entry (id 0)")
        self.words = list(words)
        self.dropout = dropout
        self.embed_dim, self.hidden_dim = embed_dim, hidden_dim
        self.embedding = nn.Embedding(len(self.words), embed_dim, padding_idx=0)
        self.embedding.weight.requires_grad_(not fixed_emb)
        self.gru = nn.GRU(embed_dim, hidden_dim, batch_first=True)
        with torch.no_grad():
            self.gru.bias_hh_l0.zero_()
        self.gru.bias_hh_l0.requires_grad_(False)

    def load_original(self, folder: str | Path) -> UniSkipLoadReport:
        """Kiros et al.'s ``uni_skip.npz``, ``utable.npy`` and ``dictionary.txt`` from ``folder``; nothing is
        downloaded.

        Every vocabulary word gets the table row of its ``dictionary.txt`` line (an exact, case-sensitive match;
        a word listed twice takes its last line, as in the port). A word the dictionary lacks gets the vector
        of its ``UNK`` line, as the port does; such words are logged and returned in the report. All files are
        read and checked before any weight changes, so a failed load leaves the module as it was.
        """
        folder = Path(folder)
        theano = _read_gru_file(folder / GRU_FILE, _theano_shapes(self.embed_dim, self.hidden_dim))
        dictionary = _read_dictionary(folder / DICTIONARY_FILE)
        table = _read_table(folder / TABLE_FILE)
        if len(table) != len(dictionary):
            raise WeightsError(f"{folder / TABLE_FILE} has {len(table)} rows but {folder / DICTIONARY_FILE} has "
                               f"{len(dictionary)} lines; row k of the table is the vector of line k's word")
        rows, unknown = self._dictionary_rows(dictionary, folder / DICTIONARY_FILE)
        vectors = _table_rows(table, rows, self.embed_dim, folder / TABLE_FILE)

        # Theano keeps inputs on the left (x W), torch on the right (W x), hence the transposes. The columns of
        # W, U and b are (reset | update), the order torch stacks its first two gates in; the candidate's
        # weights (Wx, Ux, bx) come third.
        weights = {
            self.gru.weight_ih_l0: np.concatenate([theano["encoder_W"].T, theano["encoder_Wx"].T]),
            self.gru.weight_hh_l0: np.concatenate([theano["encoder_U"].T, theano["encoder_Ux"].T]),
            self.gru.bias_ih_l0: np.concatenate([theano["encoder_b"], theano["encoder_bx"]]),
        }
        with torch.no_grad():
            for param, value in weights.items():
                param.copy_(torch.from_numpy(value))
            self.gru.bias_hh_l0.zero_()
            self.embedding.weight[0].zero_()
            self.embedding.weight[1:].copy_(torch.from_numpy(vectors))
        report = UniSkipLoadReport(folder, len(self.words) - 1, unknown)
        report.log()
        return report

    def remap_state(self, state: StateDict) -> Remapped:
        """The port's parameter names (a released AMFMN checkpoint's ``text_feature.seq2vec.*``) -> this module's:
        its separate gate layers stacked in torch's order, the hidden-side bias zero."""
        cell = "rnn.gru_cell."
        if f"{cell}weight_ir.weight" not in state:
            return Remapped(dict(state))
        out = {key: value for key, value in state.items() if not key.startswith(cell)}
        out["gru.weight_ih_l0"] = torch.cat([state[f"{cell}weight_i{gate}.weight"] for gate in "rin"])
        out["gru.bias_ih_l0"] = torch.cat([state[f"{cell}weight_i{gate}.bias"] for gate in "rin"])
        out["gru.weight_hh_l0"] = torch.cat([state[f"{cell}weight_h{gate}.weight"] for gate in "rin"])
        out["gru.bias_hh_l0"] = torch.zeros_like(out["gru.bias_ih_l0"])
        used = {f"{cell}weight_{side}{gate}.{kind}" for side in "ih" for gate in "rin" for kind in ("weight", "bias")}
        return Remapped(out, dropped=[f"{key} (not a uni-skip parameter)" for key in state
                                      if key.startswith(cell) and key not in used])

    def _dictionary_rows(self, dictionary: list[str], path: Path) -> tuple[list[int], list[str]]:
        """The table row of every word but padding, and the words that fall back to the ``UNK`` row."""
        index = {word: row for row, word in enumerate(dictionary)}
        unknown = [word for word in self.words[1:] if word not in index]
        if unknown and UNKNOWN_WORD not in index:
            raise WeightsError(f"{path} has no {UNKNOWN_WORD!r} line, whose vector the {len(unknown)} vocabulary "
                               f"words it lacks would get (e.g. {', '.join(map(repr, unknown[:SHOWN_UNKNOWN]))})")
        return [index.get(word, index.get(UNKNOWN_WORD)) for word in self.words[1:]], unknown

    def forward(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """``ids`` [B, L] (0 = padding), ``lengths`` [B] in 1..L -> [B, hidden_dim]. Padding after a caption's
        last token never reaches its state: the GRU is causal and the state is read at the caption's end.
        (The port counts the non-zero ids when no lengths are given; here the caller, who knows them, passes
        them, and an empty caption is an error rather than the state after a run of padding.)"""
        lengths_cpu = _checked_lengths(ids, lengths)
        x = self.embedding(ids)
        if self.training and self.dropout > 0:
            return self._bayesian_last_state(x, lengths_cpu.to(ids.device))
        packed = pack_padded_sequence(x, lengths_cpu, batch_first=True, enforce_sorted=False)
        return self.gru(packed)[1][0]

    def _bayesian_last_state(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """The GRU under variational dropout, as the port's ``BayesianGRU`` applies it: six masks per caption
        (one per gate on the input, one per gate on the hidden state), drawn once and reused at every step.
        ``nn.GRU`` cannot hold a mask fixed over time, so this loops over time steps, the batch vectorised."""
        batch, steps, hidden = x.shape[0], int(lengths.max()), self.hidden_dim
        x = x[:, :steps]
        input_masks, hidden_masks = self._sample_masks(batch, x)
        w_ih = self.gru.weight_ih_l0.view(3, hidden, self.embed_dim)
        w_hh = self.gru.weight_hh_l0.view(3, hidden, hidden)
        b_ih = self.gru.bias_ih_l0.view(3, 1, 1, hidden)
        b_hh = self.gru.bias_hh_l0.view(3, 1, hidden)
        # The input masks do not change over time, so one product gives every step's input projections.
        x_proj = torch.einsum("gbte,ghe->gbth", x.unsqueeze(0) * input_masks.unsqueeze(2), w_ih) + b_ih
        h = x.new_zeros(batch, hidden)
        for t in range(steps):
            h_proj = torch.baddbmm(b_hh, h.unsqueeze(0) * hidden_masks, w_hh.transpose(1, 2))
            reset = torch.sigmoid(x_proj[0, :, t] + h_proj[0])
            update = torch.sigmoid(x_proj[1, :, t] + h_proj[1])
            candidate = torch.tanh(x_proj[2, :, t] + reset * h_proj[2])
            stepped = update * h + (1 - update) * candidate
            h = torch.where((t < lengths).unsqueeze(1), stepped, h)  # a finished caption keeps its last state
        return h

    def _sample_masks(self, batch: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Inverted-dropout masks for the (reset, update, candidate) gates: input [3, B, E], hidden [3, B, H]."""
        keep = 1.0 - self.dropout

        def draw(width: int) -> torch.Tensor:
            return torch.bernoulli(like.new_full((3, batch, width), keep)) / keep

        return draw(self.embed_dim), draw(self.hidden_dim)


def _checked_lengths(ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """``lengths`` on the CPU as int64 (packing needs them there), after checking them against ``ids``."""
    if ids.dim() != 2 or lengths.shape != ids.shape[:1]:
        raise ValueError(f"expected ids [B, L] and lengths [B], got {tuple(ids.shape)} and {tuple(lengths.shape)}")
    lengths = lengths.detach().to("cpu", torch.int64)
    if len(lengths) and (lengths.min() < 1 or lengths.max() > ids.shape[1]):
        raise ValueError(f"caption lengths must lie in 1..{ids.shape[1]}, got {lengths.tolist()}")
    return lengths


def _theano_shapes(embed_dim: int, hidden_dim: int) -> dict[str, tuple[int, ...]]:
    """The encoder arrays of ``uni_skip.npz`` and their shapes: ``W``, ``U``, ``b`` hold the reset and update
    gates side by side, ``Wx``, ``Ux``, ``bx`` the candidate state."""
    return {
        "encoder_W": (embed_dim, 2 * hidden_dim), "encoder_U": (hidden_dim, 2 * hidden_dim),
        "encoder_b": (2 * hidden_dim,), "encoder_Wx": (embed_dim, hidden_dim),
        "encoder_Ux": (hidden_dim, hidden_dim), "encoder_bx": (hidden_dim,),
    }


def _require(path: Path) -> None:
    if not path.is_file():
        raise WeightsError(f"skip-thoughts file not found: {path} (the folder needs {GRU_FILE}, {TABLE_FILE} and "
                           f"{DICTIONARY_FILE}, Kiros et al.'s originals; nothing is downloaded)")


def _read_gru_file(path: Path, shapes: dict[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    _require(path)
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        raise WeightsError(f"{path} cannot be read as an .npz archive: {err}") from err
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise WeightsError(f"{path} holds a single array, not the .npz archive of a skip-thoughts model")
    with archive:
        missing = [key for key in shapes if key not in archive.files]
        if missing:
            raise WeightsError(f"{path} lacks {', '.join(missing)} (a uni-skip model has {', '.join(shapes)})")
        try:
            arrays = {key: archive[key] for key in shapes}
        except (OSError, ValueError, zipfile.BadZipFile) as err:
            raise WeightsError(f"{path} cannot be read: {err}") from err
    wrong = [f"{key} {arrays[key].shape} (expected {shape})" for key, shape in shapes.items()
             if arrays[key].shape != shape]
    if wrong:
        embed_dim, hidden_dim = shapes["encoder_Wx"]
        raise WeightsError(f"{path}: {'; '.join(wrong)}, for this encoder's embed_dim {embed_dim} and hidden_dim "
                           f"{hidden_dim} (the original uni-skip model has 620 and 2400)")
    return arrays


def _read_dictionary(path: Path) -> list[str]:
    """One word per ``\\n``-ended line, stripped as the port strips it. Bytes that are not UTF-8 are kept as
    escapes rather than failing the load: such a word cannot match a vocabulary word anyway."""
    _require(path)
    data = path.read_bytes()
    lines = data.split(b"\n")
    if data.endswith(b"\n"):
        lines.pop()
    return [line.decode("utf-8", "surrogateescape").strip() for line in lines]


# The original utable.npy is a Python 2 pickle of an object array of word vectors. Only what such a pickle
# names is allowed: an arbitrary pickle could run any code while it loads.
_RECONSTRUCT = np.ndarray((0,)).__reduce__()[0]
_ARRAY_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): codecs.encode,  # how a Python 3 protocol-2 pickle writes bytes
}


class _ArrayUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> object:
        try:
            return _ARRAY_GLOBALS[module, name]
        except KeyError:
            raise pickle.UnpicklingError(f"refusing {module}.{name}: only numpy arrays are read") from None


def _read_table(path: Path) -> np.ndarray:
    """The word-vector table: a 1-D object array of vectors (the original layout) or a 2-D float array (a
    re-saved copy, memory-mapped since only the vocabulary's rows are needed)."""
    _require(path)
    try:
        with open(path, "rb") as handle:
            version = np.lib.format.read_magic(handle)
            read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                           else np.lib.format.read_array_header_2_0)
            shape, _, dtype = read_header(handle)
            if dtype.hasobject:
                # encoding="latin1" turns the raw bytes of Python 2 str back into array data
                table = _ArrayUnpickler(handle, encoding="latin1").load()
            else:
                table = np.load(path, mmap_mode="r", allow_pickle=False)
    except Exception as err:  # numpy and pickle raise many types for a corrupt or foreign file
        raise WeightsError(f"{path} cannot be read as a word-vector table: {err}") from err
    object_table = isinstance(table, np.ndarray) and table.dtype.hasobject and table.ndim == 1
    float_table = isinstance(table, np.ndarray) and table.dtype.kind == "f" and table.ndim == 2
    if not (object_table or float_table) or table.shape[:1] != shape[:1]:
        raise WeightsError(f"{path} holds {type(table).__name__} {getattr(table, 'shape', '')} "
                           f"{getattr(table, 'dtype', '')}: expected one word vector per row")
    return table


def _table_rows(table: np.ndarray, rows: list[int], embed_dim: int, path: Path) -> np.ndarray:
    """The vectors of ``rows`` as a float32 array [len(rows), embed_dim], after checking their width."""
    if not table.dtype.hasobject:
        if table.shape[1] != embed_dim:
            raise WeightsError(f"{path} has {table.shape[1]}-d word vectors; this encoder's embed_dim is "
                               f"{embed_dim} (the original utable is 620-d)")
        return np.asarray(table[rows], dtype=np.float32)
    vectors = [np.asarray(table[row]) for row in rows]
    for row, vector in zip(rows, vectors):
        if vector.dtype.kind != "f" or vector.size != embed_dim:
            raise WeightsError(f"{path}: row {row} is {vector.dtype} {vector.shape}; this encoder's embed_dim is "
                               f"{embed_dim} (the original utable has 620-d float vectors)")
    return np.array([vector.reshape(embed_dim) for vector in vectors], dtype=np.float32).reshape(-1, embed_dim)
