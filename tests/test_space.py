import numpy as np
import pytest

from glora_ray import TENSORS, GLoRARayTypeError, SearchSpace, SearchSpaceError


def test_choices_follow_spec_table():
    space = SearchSpace((8, 4))
    assert space.choices("A") == ("lora8", "lora4", "vector", "scalar", "none")
    assert space.choices("B") == space.choices("A")
    assert space.choices("C") == ("lora8", "lora4", "vector", "none")
    assert space.choices("D") == ("vector", "scalar", "none")
    assert space.choices("E") == space.choices("D")


@pytest.mark.parametrize("ranks, size", [((4,), 432), ((8, 4), 900), ((4, 8), 900)])
def test_layer_space_size(ranks, size):
    space = SearchSpace(ranks)
    assert space.layer_space_size == size
    choices = list(space.iter_layer_choices())
    assert len(choices) == size
    assert len({tuple(sorted(c.items())) for c in choices}) == size


def test_encode_decode_round_trip_and_string_key():
    space = SearchSpace((8, 4))
    rng = np.random.default_rng(3)
    names = [f"blocks.{i}.fc" for i in range(7)]
    subnet = {n: space.sample_layer_choice(rng) for n in names}
    genes = space.encode(subnet, names)
    assert genes.dtype == np.int8 and genes.shape == (7 * len(TENSORS),)
    assert space.decode(genes, names) == subnet
    key = space.genes_to_string(genes)
    assert key.startswith("r8r4:") and len(key) == len("r8r4:") + genes.size
    assert np.array_equal(space.genes_from_string(key, len(names)), genes)
    # Hashable and canonical: dict order of the mapping does not change the key.
    reordered = {n: dict(reversed(list(subnet[n].items()))) for n in reversed(names)}
    assert space.genes_to_string(space.encode(reordered, names)) == key


def test_bad_choice_names_layer_tensor_and_allowed_values():
    space = SearchSpace((8, 4))
    bad = {"A": "lora16", "B": "none", "C": "none", "D": "none", "E": "none"}
    with pytest.raises(SearchSpaceError) as err:
        space.encode({"blocks.0.qkv": bad}, ["blocks.0.qkv"])
    text = str(err.value)
    assert "blocks.0.qkv" in text and "'A'" in text and "lora8" in text and "lora16" in text
    with pytest.raises(SearchSpaceError, match="scalar"):
        space.encode_layer({"A": "none", "B": "none", "C": "scalar", "D": "none", "E": "none"}, "x")
    with pytest.raises(SearchSpaceError, match="no choice for tensor 'E'"):
        space.encode_layer({"A": "none", "B": "none", "C": "none", "D": "none"}, "x")
    with pytest.raises(SearchSpaceError, match="out of range"):
        space.validate_genes(np.array([0, 0, 9, 0, 0]), 1)
    with pytest.raises(SearchSpaceError, match="outside"):
        space.genes_from_string("r8r4:00!00", 1)
    with pytest.raises(SearchSpaceError):
        SearchSpace((4, 4))


def test_sampling_is_driven_by_the_generator_only():
    space = SearchSpace((8, 4))
    a = space.sample_genes(np.random.default_rng(11), 48)
    b = space.sample_genes(np.random.default_rng(11), 48)
    c = space.sample_genes(np.random.default_rng(12), 48)
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    # Every value of every gene is reachable by sampling.
    many = np.stack([space.sample_genes(np.random.default_rng(s), 1) for s in range(400)])
    card = space.gene_cardinalities(1)
    for g in range(len(TENSORS)):
        assert set(many[:, g]) == set(range(card[g]))


# -- misuse: ranks are distinct positive integers, nothing is coerced into one ----------------
def test_fractional_rank_is_refused():
    with pytest.raises(GLoRARayTypeError, match=r"ranks must be a sequence of distinct positive integers.*8.7"):
        SearchSpace(ranks=(8.7, 4))


def test_string_ranks_are_refused():
    with pytest.raises(GLoRARayTypeError, match=r"ranks must be .*got str '84'"):
        SearchSpace(ranks="84")


def test_bool_rank_is_refused():
    with pytest.raises(GLoRARayTypeError, match=r"True in \(True, 4\) is not an integer"):
        SearchSpace(ranks=(True, 4))
    assert SearchSpace(np.array([8, 4])).ranks == (8, 4)  # numpy integers are integers


def test_forms_narrow_a_tensor_and_become_part_of_the_space_identity():
    full = SearchSpace((4, 2))
    narrow = SearchSpace((4, 2), forms={"B": ("none", "lora"), "D": ["none"]})
    assert narrow.choices("B") == ("lora4", "lora2", "none")  # the table's order, whatever was given
    assert narrow.choices("D") == ("none",) and narrow.choices("A") == full.choices("A")
    assert narrow.layer_space_size == 5 * 3 * 4 * 1 * 3 == len(list(narrow.iter_layer_choices()))
    assert narrow.restricted_forms == {"B": ("lora", "none"), "D": ("none",)}
    assert narrow.key_prefix == "r4r2-Bln-Dn:" and narrow != full
    # Naming every form of a tensor is the full space again.
    assert SearchSpace((4, 2), forms={"C": ("lora", "vector", "none")}) == full
    assert SearchSpace.from_dict(narrow.to_dict()) == narrow and hash(SearchSpace.from_dict(narrow.to_dict())) == hash(narrow)
    assert full.to_dict() == {"ranks": [4, 2]}
    # Sampling stays inside, and a key of the full space is not read by the narrowed one.
    genes = narrow.sample_genes(np.random.default_rng(0), 50)
    decoded = narrow.decode(genes, [f"l{i}" for i in range(50)])
    assert {c["B"] for c in decoded.values()} <= {"lora4", "lora2", "none"} and {c["D"] for c in decoded.values()} == {"none"}
    with pytest.raises(SearchSpaceError, match="r4r2-Bln-Dn:"):
        narrow.genes_from_string(full.genes_to_string(np.zeros(5, dtype=np.int8)), 1)
    with pytest.raises(SearchSpaceError, match="'vector' is not in the space"):
        narrow.encode_layer({**full.empty_layer_choice(), "B": "vector"})


@pytest.mark.parametrize("forms, error, fragment", [
    ({"F": ("none",)}, SearchSpaceError, "unknown tensor"),
    ({"C": ("scalar", "none")}, SearchSpaceError, "'scalar' is not a form of C"),
    ({"B": ("lora",)}, SearchSpaceError, "must keep 'none'"),
    ({"B": "lora"}, GLoRARayTypeError, "sequence of kinds"),
    (["B"], GLoRARayTypeError, "mapping tensor -> kinds"),
])
def test_bad_forms_are_refused_naming_tensor_and_allowed_kinds(forms, error, fragment):
    with pytest.raises(error, match=fragment):
        SearchSpace((4,), forms=forms)
