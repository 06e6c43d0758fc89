"""A pod's 2-D mesh: parameters and optimizer state sharded over fsdp and model, the bytes that
costs per device, and a warning (or, strict, an error) for every dimension left whole."""

import json
import math
import warnings

import jax
import pytest
from jax.sharding import PartitionSpec as P

from model import cli
from model.config import get_config
from model.palm import param_count
from model.partitioning import LayoutError, PodMesh, UnsplitWarning, check_layout, layout

TINY = get_config("palm-tiny")


def test_mesh_parsing():
    assert PodMesh.parse("model=2,fsdp=4").axes == (("fsdp", 4), ("model", 2))
    assert PodMesh.parse("data=2,fsdp=256,model=12").size == 6144
    assert PodMesh.parse("fsdp=2").batch_ways == 2
    assert PodMesh.parse("data=2,fsdp=3,model=4").batch_ways == 6
    for bad in ("2x1", "fsdp=2,fsdp=2", "tensor=2", "fsdp=0", "fsdp=-1"):
        with pytest.raises(ValueError):
            PodMesh.parse(bad)


def test_parameters_split_over_both_axes():
    placed = layout(TINY, PodMesh.parse("fsdp=2,model=2"))
    specs = placed.specs
    assert specs["layers"]["wq"] == P(None, "fsdp", "model")
    assert specs["layers"]["w_down"] == P(None, "model", "fsdp")
    assert specs["embedding"] == P("model", "fsdp")
    assert placed.unsplit == ()
    # Every weight matrix is split 4 ways; the small kv projections and norm scales only over fsdp.
    whole = sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(jax.eval_shape(
        lambda: __import__("model").init_params(TINY, jax.random.key(0)))))
    assert whole / 4 < placed.param_bytes_per_device / 4 < whole / 2
    assert placed.optimizer_bytes_per_device == 2 * placed.param_bytes_per_device  # float32 moments


def test_palm_540b_on_a_256_by_12_pod():
    config = get_config("palm-540b")
    placed = layout(config, PodMesh.parse("fsdp=256,model=12"))
    # Float32 parameters: at least the fully sharded share, far from 45B parameters per chip.
    floor = 4 * param_count(config, include_norm_scales=True) / 3072
    assert floor < placed.param_bytes_per_device < 1.2 * floor
    assert placed.optimizer_bytes_per_device == 2 * placed.param_bytes_per_device
    (vocab,) = placed.unsplit  # 256,000 rows do not divide 12 model shards
    assert (vocab.parameter, vocab.dim, vocab.ways) == ("embedding", 0, 12)
    local = 256_000 * (18432 // 256)
    assert vocab.param_bytes == 4 * (local - local // 12)
    assert vocab.optimizer_bytes == 2 * vocab.param_bytes
    assert "embedding" in vocab.message() and "model=12" in vocab.message()


def test_warning_and_strict_error():
    config = TINY.replace(vocab_size=510)  # 510 rows over model=4: not divisible
    mesh = PodMesh.parse("fsdp=2,model=4")
    with pytest.warns(UnsplitWarning, match="embedding: dimension 0"):
        check_layout(config, mesh)
    with pytest.raises(LayoutError, match="embedding"):
        check_layout(config, mesh, strict=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_layout(TINY, PodMesh.parse("fsdp=2,model=2"), strict=True)


def test_cli_model_reports_bytes_per_device(capsys):
    assert cli.main(["model", "--config", "palm-540b", "--mesh", "fsdp=256,model=12", "--json"]) == 0
    out = capsys.readouterr()
    report = json.loads(out.out)["layout"]
    assert report["devices"] == 3072
    assert report["param_bytes_per_device"] == layout(get_config("palm-540b"),
                                                      PodMesh.parse("fsdp=256,model=12")).param_bytes_per_device
    assert report["optimizer_bytes_per_device"] == 2 * report["param_bytes_per_device"]
    assert report["replicated_dimensions"][0]["parameter"] == "embedding"
    assert "warning: embedding" in out.err


def test_cli_train_strict_refuses_before_starting_a_cluster(capsys):
    import argparse

    from model import train_cli

    parser = argparse.ArgumentParser()
    train_cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["train", "vocab_size=510", "--mesh", "fsdp=1,model=4", "--strict"])
    assert args.func(args) == 2
    assert "embedding" in capsys.readouterr().err
    args = parser.parse_args(["train", "--islands", "3", "--global-batch", "8"])
    assert args.func(args) == 2  # 8 sequences do not split over 3 pods x 2 fsdp shards
    assert "does not split" in capsys.readouterr().err
    args = parser.parse_args(["train", "--mesh", "2x2", "--hosts-per-island", "3"])
    assert args.mesh == PodMesh.parse("fsdp=2,model=2")  # the older AxB form
    assert args.func(args) == 2 and "--hosts-per-island 3" in capsys.readouterr().err


def test_a_partly_split_dimension_reports_the_axis_it_misses():
    # mlp over (fsdp, model): d_ff 512 divides fsdp=2 but not fsdp x model = 2 x 3.
    rules = tuple((name, ("fsdp", "model") if name == "mlp" else None) for name, _ in TINY.logical_axis_rules)
    placed = layout(TINY.replace(logical_axis_rules=rules), PodMesh.parse("fsdp=2,model=3"))
    assert placed.specs["layers"]["w_up"] == P(None, None, "fsdp")
    missed = {(u.parameter, u.axes) for u in placed.unsplit}
    assert ("layers/w_up", ("model",)) in missed and ("layers/w_down", ("model",)) in missed
