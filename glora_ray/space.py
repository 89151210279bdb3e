"""The GLoRA search space: which form each support tensor A..E may take (docs/method.md §1).

A choice is a typed ``Choice`` (kind plus rank); its user-facing name ("lora8", "vector", ...)
is generated from it and looked up in a table, never parsed.  Inside, a subnet is a
fixed-length integer array (one gene per layer and tensor, layer-major) and a layer's choice a
tuple of ``Choice``; names appear only at the edges (the user API, Parquet columns, JSON).  The
canonical string form, the *key*, is the space's identity (``"r8r4:"``) followed by one
character per gene, so a key is never read by a space it was not made for.
"""
from __future__ import annotations

import enum
import numbers
from dataclasses import dataclass
from typing import Iterator, Mapping, Sequence

import numpy as np

from .errors import GLoRARayError, GLoRARayTypeError

TENSORS: tuple[str, ...] = ("A", "B", "C", "D", "E")

# Characters for the compact string form: one per gene.
_GENE_ALPHABET = "0123456789abcdefghijklmnopqrstuvwxyz"

LayerChoice = Mapping[str, str]  # tensor name -> choice name, e.g. {"A": "lora8", ...}
Subnet = Mapping[str, LayerChoice]  # layer name -> LayerChoice


class SearchSpaceError(GLoRARayError):
    """A choice, encoding or subnet that the space does not contain."""


def _abbreviate(text: str, limit: int = 40) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def _check_ranks(ranks: object) -> tuple[int, ...]:
    """``ranks`` as a tuple of ints, refusing anything that is not distinct positive integers."""
    wanted = "a sequence of distinct positive integers, e.g. (8, 4)"
    if isinstance(ranks, (str, bytes)) or not isinstance(ranks, Sequence) and not isinstance(ranks, np.ndarray):
        raise GLoRARayTypeError(f"SearchSpace ranks must be {wanted}, got {type(ranks).__name__} {ranks!r}")
    bad = [r for r in ranks if isinstance(r, (bool, np.bool_)) or not isinstance(r, numbers.Integral)]
    if bad:
        raise GLoRARayTypeError(f"SearchSpace ranks must be {wanted}; {bad[0]!r} in {tuple(ranks)!r} is not an integer")
    ranks = tuple(int(r) for r in ranks)
    if not ranks or any(r <= 0 for r in ranks) or len(set(ranks)) != len(ranks):
        raise SearchSpaceError(f"SearchSpace ranks must be {wanted}, got {ranks!r}")
    return ranks


class Kind(enum.Enum):
    LORA = "lora"
    VECTOR = "vector"
    SCALAR = "scalar"
    NONE = "none"


@dataclass(frozen=True)
class Choice:
    kind: Kind
    rank: int = 0  # only for Kind.LORA

    @property
    def name(self) -> str:
        return f"lora{self.rank}" if self.kind is Kind.LORA else self.kind.value


# Which kinds each tensor allows (docs/method.md §1 table); LoRA expands to one choice per rank.
_ALLOWED_KINDS: dict[str, tuple[Kind, ...]] = {
    "A": (Kind.LORA, Kind.VECTOR, Kind.SCALAR, Kind.NONE),
    "B": (Kind.LORA, Kind.VECTOR, Kind.SCALAR, Kind.NONE),
    "C": (Kind.LORA, Kind.VECTOR, Kind.NONE),
    "D": (Kind.VECTOR, Kind.SCALAR, Kind.NONE),
    "E": (Kind.VECTOR, Kind.SCALAR, Kind.NONE),
}


# One letter per kind for the key prefix of a space with restricted forms (generated, never parsed).
_KIND_LETTER: dict[Kind, str] = {Kind.LORA: "l", Kind.VECTOR: "v", Kind.SCALAR: "s", Kind.NONE: "n"}

FormsSpec = Mapping[str, Sequence["Kind | str"]]  # tensor -> the kinds it may take


def _check_forms(forms: FormsSpec | None) -> dict[str, tuple[Kind, ...]]:
    """The kinds each tensor may take, in the table's order; a tensor not named keeps all of them.

    Refuses an unknown tensor or kind, a kind the tensor does not have (C has no scalar; D and E no
    LoRA), and a restriction without ``none``: every tensor keeps ``none`` so that the empty subnet,
    the baselines' "everything else none" and a budget's lower end stay in the space.
    """
    if forms is None:
        return dict(_ALLOWED_KINDS)
    if not isinstance(forms, Mapping):
        raise GLoRARayTypeError(f"SearchSpace forms must be a mapping tensor -> kinds, e.g. "
                                f"{{'B': ('lora', 'none')}}, got {type(forms).__name__} {forms!r}")
    unknown = sorted(set(forms) - set(TENSORS), key=str)
    if unknown:
        raise SearchSpaceError(f"SearchSpace forms: unknown tensor(s) {unknown}; tensors are {list(TENSORS)}")
    kinds_by_name = {k.value: k for k in Kind}
    out = dict(_ALLOWED_KINDS)
    for tensor, given in forms.items():
        allowed = _ALLOWED_KINDS[tensor]
        if isinstance(given, (str, bytes, Kind)) or not isinstance(given, Sequence):
            raise GLoRARayTypeError(f"SearchSpace forms[{tensor!r}] must be a sequence of kinds, "
                                    f"e.g. ('lora', 'none'), got {given!r}")
        wanted = set()
        for item in given:
            kind = item if isinstance(item, Kind) else kinds_by_name.get(item) if isinstance(item, str) else None
            if kind not in allowed:
                raise SearchSpaceError(f"SearchSpace forms[{tensor!r}]: {item!r} is not a form of {tensor}; "
                                       f"allowed: {[k.value for k in allowed]}")
            wanted.add(kind)
        if Kind.NONE not in wanted:
            raise SearchSpaceError(f"SearchSpace forms[{tensor!r}] = {[getattr(x, 'value', x) for x in given]} must keep 'none' "
                                   f"(the empty subnet and every baseline need it)")
        out[tensor] = tuple(k for k in allowed if k in wanted)
    return out


class SearchSpace:
    """The choices of every support tensor for a set of LoRA ranks, e.g. ``SearchSpace((8, 4))``.

    ``forms`` optionally narrows the kinds some tensors may take, e.g.
    ``SearchSpace((4, 2), forms={"B": ("lora", "none")})`` (docs/method.md §1.9); by default every
    tensor has the paper's full set.
    """

    def __init__(self, ranks: Sequence[int] = (8, 4), forms: FormsSpec | None = None):
        ranks = _check_ranks(ranks)
        # Largest first, so gene 0 of A, B, C is always the largest LoRA.
        self.ranks: tuple[int, ...] = tuple(sorted(ranks, reverse=True))
        self.max_rank: int = self.ranks[0]
        self.kinds: dict[str, tuple[Kind, ...]] = _check_forms(forms)
        self._choices: dict[str, tuple[Choice, ...]] = {}
        for tensor, kinds in self.kinds.items():
            expanded: list[Choice] = []
            for kind in kinds:
                if kind is Kind.LORA:
                    expanded.extend(Choice(Kind.LORA, r) for r in self.ranks)
                else:
                    expanded.append(Choice(kind))
            self._choices[tensor] = tuple(expanded)
        self._index: dict[str, dict[str, int]] = {
            t: {c.name: i for i, c in enumerate(cs)} for t, cs in self._choices.items()
        }
        if max(len(cs) for cs in self._choices.values()) > len(_GENE_ALPHABET):
            raise SearchSpaceError(f"too many ranks for the string encoding: {ranks!r}")

    # -- one layer ---------------------------------------------------------------------
    def choices(self, tensor: str) -> tuple[str, ...]:
        """Names of the choices of one tensor, largest LoRA first, ``none`` last."""
        return tuple(c.name for c in self._tensor_choices(tensor))

    def choice_objects(self, tensor: str) -> tuple[Choice, ...]:
        return self._tensor_choices(tensor)

    def num_choices(self, tensor: str) -> int:
        return len(self._tensor_choices(tensor))

    @property
    def layer_space_size(self) -> int:
        size = 1
        for t in TENSORS:
            size *= self.num_choices(t)
        return size

    def largest_layer_choice(self) -> dict[str, str]:
        return {t: self.choices(t)[0] for t in TENSORS}

    def empty_layer_choice(self) -> dict[str, str]:
        return {t: Kind.NONE.value for t in TENSORS}

    def iter_layer_choices(self) -> Iterator[dict[str, str]]:
        """Every choice of one layer (the product over tensors), in gene order."""
        for genes in np.ndindex(*(self.num_choices(t) for t in TENSORS)):
            yield self.decode_layer(genes)

    def sample_layer_choice(self, rng: np.random.Generator) -> dict[str, str]:
        return self.decode_layer(self.sample_layer_genes(rng))

    def sample_layer_genes(self, rng: np.random.Generator) -> np.ndarray:
        return np.array([rng.integers(self.num_choices(t)) for t in TENSORS], dtype=np.int8)

    def encode_layer(self, choice: LayerChoice, layer: str = "<layer>") -> np.ndarray:
        """The genes of one layer's choice; any unknown tensor or value is an error naming it."""
        if not isinstance(choice, Mapping):
            raise SearchSpaceError(f"layer {layer!r}: a choice is a mapping tensor -> choice name, got {choice!r}")
        unknown = set(choice) - set(TENSORS)
        if unknown:
            raise SearchSpaceError(f"layer {layer!r}: unknown tensor(s) {sorted(unknown)}; tensors are {list(TENSORS)}")
        genes = np.empty(len(TENSORS), dtype=np.int8)
        for i, t in enumerate(TENSORS):
            if t not in choice:
                raise SearchSpaceError(f"layer {layer!r}: no choice for tensor {t!r}; allowed: {list(self.choices(t))}")
            value = choice[t]
            index = self._index[t].get(value) if isinstance(value, str) else None
            if index is None:
                raise SearchSpaceError(
                    f"layer {layer!r}, tensor {t!r}: {value!r} is not in the space; allowed: {list(self.choices(t))}"
                )
            genes[i] = index
        return genes

    def decode_layer(self, genes: Sequence[int], layer: str = "<layer>") -> dict[str, str]:
        return self.choice_names(self.choices_from_genes(genes, layer))

    def choices_from_genes(self, genes: Sequence[int], layer: str = "<layer>") -> tuple[Choice, ...]:
        """One layer's genes as one ``Choice`` per tensor, refusing a wrong count or value."""
        genes = np.asarray(genes)
        if genes.shape != (len(TENSORS),):
            raise SearchSpaceError(f"layer {layer!r}: genes must be {len(TENSORS)} integers (one per tensor "
                                   f"{', '.join(TENSORS)}), got shape {genes.shape}")
        if not np.issubdtype(genes.dtype, np.integer):
            raise SearchSpaceError(f"layer {layer!r}: genes must be integers, got {genes.tolist()!r}")
        out = []
        for t, g in zip(TENSORS, genes.tolist()):
            cs = self._tensor_choices(t)
            if not 0 <= g < len(cs):
                raise SearchSpaceError(f"layer {layer!r}, tensor {t!r}: gene {g} out of range 0..{len(cs) - 1} "
                                       f"({', '.join(c.name for c in cs)})")
            out.append(cs[g])
        return tuple(out)

    def choices_from_names(self, choice: LayerChoice, layer: str = "<layer>") -> tuple[Choice, ...]:
        """One layer's choice by name (``{"A": "lora8", ...}``) as one ``Choice`` per tensor."""
        return tuple(self._tensor_choices(t)[g] for t, g in zip(TENSORS, self.encode_layer(choice, layer)))

    def check_choices(self, choices: Sequence[Choice], layer: str = "<layer>") -> tuple[Choice, ...]:
        """``choices`` as a tuple, refusing anything but one ``Choice`` of this space per tensor."""
        if isinstance(choices, (str, bytes)) or not isinstance(choices, Sequence) or len(choices) != len(TENSORS):
            raise SearchSpaceError(f"layer {layer!r}: a choice is a mapping tensor -> name or {len(TENSORS)} "
                                   f"Choice objects, got {choices!r}")
        for t, c in zip(TENSORS, choices):
            if c not in self._tensor_choices(t):
                raise SearchSpaceError(f"layer {layer!r}, tensor {t!r}: {c!r} is not in the space; "
                                       f"allowed: {list(self.choices(t))}")
        return tuple(choices)

    def choice_names(self, choices: Sequence[Choice]) -> dict[str, str]:
        return {t: c.name for t, c in zip(TENSORS, choices)}

    def largest_layer_choices(self) -> tuple[Choice, ...]:
        return tuple(self._tensor_choices(t)[0] for t in TENSORS)

    # -- whole subnets -----------------------------------------------------------------
    def num_genes(self, num_layers: int) -> int:
        return num_layers * len(TENSORS)

    def gene_cardinalities(self, num_layers: int) -> np.ndarray:
        """How many values each gene of a subnet over ``num_layers`` layers can take."""
        per_layer = [self.num_choices(t) for t in TENSORS]
        return np.tile(np.array(per_layer, dtype=np.int64), num_layers)

    def sample_genes(self, rng: np.random.Generator, num_layers: int) -> np.ndarray:
        return rng.integers(self.gene_cardinalities(num_layers)).astype(np.int8)

    def encode(self, subnet: Subnet, layer_names: Sequence[str]) -> np.ndarray:
        """A subnet mapping as a fixed-length int8 gene array in ``layer_names`` order."""
        missing = [n for n in layer_names if n not in subnet]
        extra = [n for n in subnet if n not in set(layer_names)]
        if missing or extra:
            raise SearchSpaceError(
                f"subnet layers do not match the model: missing {missing[:5]}, unknown {extra[:5]}"
            )
        return np.concatenate([self.encode_layer(subnet[n], n) for n in layer_names]).astype(np.int8)

    def decode(self, genes: Sequence[int], layer_names: Sequence[str]) -> dict[str, dict[str, str]]:
        genes = self.validate_genes(genes, len(layer_names))
        k = len(TENSORS)
        return {n: self.decode_layer(genes[i * k:(i + 1) * k], n) for i, n in enumerate(layer_names)}

    def validate_genes(self, genes: Sequence[int], num_layers: int) -> np.ndarray:
        arr = np.asarray(genes)
        if arr.shape != (self.num_genes(num_layers),):
            raise SearchSpaceError(
                f"expected {self.num_genes(num_layers)} genes ({num_layers} layers x {len(TENSORS)}), got shape {arr.shape}"
            )
        if not np.issubdtype(arr.dtype, np.integer):
            raise SearchSpaceError(f"genes must be integers, got dtype {arr.dtype}")
        card = self.gene_cardinalities(num_layers)
        bad = np.flatnonzero((arr < 0) | (arr >= card))
        if bad.size:
            i = int(bad[0])
            layer, tensor = divmod(i, len(TENSORS))
            raise SearchSpaceError(
                f"gene {i} (layer {layer}, tensor {TENSORS[tensor]!r}) = {int(arr[i])} out of range 0..{int(card[i]) - 1}"
            )
        return arr.astype(np.int8)

    @property
    def _narrowed(self) -> dict[str, tuple[Kind, ...]]:
        """The tensors whose kinds differ from the full table, with the kinds they keep."""
        return {t: kinds for t, kinds in self.kinds.items() if kinds != _ALLOWED_KINDS[t]}

    @property
    def restricted_forms(self) -> dict[str, tuple[str, ...]]:
        """The tensors whose kinds are narrowed, with the kinds they keep (empty: the full space)."""
        return {t: tuple(k.value for k in kinds) for t, kinds in self._narrowed.items()}

    @property
    def key_prefix(self) -> str:
        """What every key of this space starts with: its identity, e.g. ``"r8r4:"``, or
        ``"r4r2-Bln:"`` when B keeps only lora and none."""
        narrowed = "".join(f"-{t}" + "".join(_KIND_LETTER[k] for k in kinds) for t, kinds in self._narrowed.items())
        return "".join(f"r{r}" for r in self.ranks) + narrowed + ":"

    def genes_to_string(self, genes: Sequence[int]) -> str:
        """Canonical key: the space's prefix, then one character per gene."""
        return self.key_prefix + "".join(_GENE_ALPHABET[int(g)] for g in genes)

    def genes_from_string(self, key: str, num_layers: int) -> np.ndarray:
        """The genes of ``key``, refusing a key made for another space or another layer count."""
        if not isinstance(key, str):
            raise GLoRARayTypeError(f"a subnet key is a str, got {type(key).__name__}")
        if not key.startswith(self.key_prefix):
            raise SearchSpaceError(f"subnet key {_abbreviate(key)!r} was not made for {self!r}: its keys start "
                                   f"with {self.key_prefix!r}")
        lookup = {c: i for i, c in enumerate(_GENE_ALPHABET)}
        body = key[len(self.key_prefix):]
        bad = next((c for c in body if c not in lookup), None)
        if bad is not None:
            raise SearchSpaceError(f"subnet key {_abbreviate(key)!r} has character {bad!r} outside {_GENE_ALPHABET!r}")
        return self.validate_genes(np.array([lookup[c] for c in body], dtype=np.int64), num_layers)

    # -- misc --------------------------------------------------------------------------
    def to_dict(self) -> dict:
        forms = self.restricted_forms
        return {"ranks": list(self.ranks), **({"forms": {t: list(k) for t, k in forms.items()}} if forms else {})}

    @classmethod
    def from_dict(cls, data: Mapping) -> "SearchSpace":
        return cls(tuple(data["ranks"]), data.get("forms"))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SearchSpace) and other.ranks == self.ranks and other.kinds == self.kinds

    def __hash__(self) -> int:
        return hash((self.ranks, tuple(self.kinds.values())))

    def __repr__(self) -> str:
        forms = self.restricted_forms
        return f"SearchSpace(ranks={self.ranks}" + (f", forms={forms}" if forms else "") + ")"

    def _tensor_choices(self, tensor: str) -> tuple[Choice, ...]:
        try:
            return self._choices[tensor]
        except KeyError:
            raise SearchSpaceError(f"unknown tensor {tensor!r}; tensors are {list(TENSORS)}") from None
