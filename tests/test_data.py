"""Class weights, the weighted sampler, the decode size chosen from the manifest, and the
training and eval datasets."""

from __future__ import annotations

import numpy as np
import pytest

from fer_ray.data import class_weights, resample_batch, resolve_data_size, sampling_rates


def test_class_weights_inverse_frequency_mean_one() -> None:
    w = class_weights([100, 50, 25, 0])
    present = np.array(w[:3])
    assert np.isclose(present.mean(), 1.0)
    assert np.isclose(w[1] / w[0], 2.0) and np.isclose(w[2] / w[0], 4.0)
    assert w[3] == 0.0


def test_class_weights_balanced_data_are_all_one() -> None:
    assert np.allclose(class_weights([10, 10, 10]), 1.0)


def test_sampling_rates_keep_the_epoch_size() -> None:
    counts = [400, 100, 0, 1600]
    assert np.allclose(sampling_rates(counts, "none"), [1, 1, 0, 1])
    for sampler in ("sqrt", "balanced"):
        rates = np.array(sampling_rates(counts, sampler))
        assert np.isclose((rates * counts).sum(), sum(counts)) and rates[2] == 0
    balanced = np.array(sampling_rates(counts, "balanced")) * counts
    assert np.allclose(balanced[[0, 1, 3]], 700)  # every present class equally often
    sqrt = np.array(sampling_rates(counts, "sqrt"))
    assert np.isclose(sqrt[1] / sqrt[0], 2.0) and np.isclose(sqrt[0] / sqrt[3], 2.0)


def test_resample_batch_draws_each_class_at_its_rate() -> None:
    labels = np.repeat([0, 1, 2], 4000)
    batch = {"label": labels, "image": np.array([f"img{i}".encode() for i in range(len(labels))], dtype=object)}
    out = resample_batch(batch, [1.0, 2.5, 0.25])
    per_class = np.bincount(out["label"], minlength=3)
    assert per_class[0] == 4000  # a whole rate: every row exactly that often
    assert abs(per_class[1] - 10_000) < 200 and abs(per_class[2] - 1000) < 120
    # Rows stay whole: an image keeps its own label, and rate 2.5 gives 2 or 3 copies.
    source = dict(zip(batch["image"], batch["label"]))
    assert all(source[img] == lab for img, lab in zip(out["image"], out["label"]))
    _, copies = np.unique(out["image"][out["label"] == 1], return_counts=True)
    assert set(copies) == {2, 3}
    again = resample_batch(batch, [1.0, 2.5, 0.25])
    assert not np.array_equal(again["image"], out["image"])  # a fresh draw every call


def test_data_size_never_exceeds_images_or_model_input() -> None:
    manifest = {"image": {"median_side": 48}}
    assert resolve_data_size(224, manifest, None) == 48  # FER: decode small, resize on device
    assert resolve_data_size(32, manifest, None) == 32
    assert resolve_data_size(224, {"image": {"median_side": 600}}, None) == 224
    assert resolve_data_size(224, manifest, 96) == 96  # explicit --data-size wins


def test_training_batches_mix_classes_and_reshuffle_every_epoch(ray_cluster, synth_shards) -> None:
    from fer_ray.data import split_dataset

    ds = split_dataset(str(synth_shards), "train", 32, 1, True, "medium")
    epochs = []
    for _ in range(2):
        labels = [b["label"] for b in ds.iter_batches(batch_size=16, batch_format="numpy")]
        assert sum(len(b) for b in labels) == 280
        # 7 balanced classes: a shuffled batch of 16 holds about 6 of them, a sorted one 1-2.
        assert np.mean([len(set(b.tolist())) for b in labels]) > 4.5
        epochs.append(np.concatenate(labels))
    assert not np.array_equal(epochs[0], epochs[1])  # a fresh shuffle each epoch
    assert sorted(epochs[0]) == sorted(epochs[1])


@pytest.mark.parametrize("decoded", [True, False])
def test_training_split_kept_decoded_gives_the_images_decoded_from_the_shards(
    ray_cluster, synth_shards, monkeypatch, decoded
) -> None:
    """A cached training split is decoded once, before the shuffle, when its pixels fit in
    DECODED_FRACTION of the object store, and left encoded when not; every epoch sees each
    image as the decode of its shard row gives it either way."""
    import pyarrow.parquet as pq

    import fer_ray.data as data
    from fer_ray.transforms import decode_batch

    monkeypatch.setattr(data, "DECODED_FRACTION", data.DECODED_FRACTION if decoded else 1e-9)
    table = pq.read_table(synth_shards / "train", columns=["image", "label"])
    direct = decode_batch({"image": np.array(table.column("image").to_pylist(), dtype=object),
                           "label": table.column("label").to_numpy()}, 24, 1)
    expected = sorted((img.tobytes(), int(label)) for img, label in zip(direct["image"], direct["label"]))
    ds = data.split_dataset(str(synth_shards), "train", 24, 1, True, "none")
    for _ in range(2):
        got = [(img.tobytes(), int(label)) for b in ds.iter_batches(batch_size=None, batch_format="numpy")
               for img, label in zip(b["image"], b["label"])]
        assert sorted(got) == expected
    # Ray Data's stats name every stage behind the epoch's, the cached ones included.
    assert ("MapBatches(decode_batch)" in ds.stats()) == decoded


def test_training_data_resampled_by_class_every_epoch(ray_cluster, synth_shards) -> None:
    from fer_ray.data import split_dataset

    rates = [3.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0]  # 40 images per class in the synthetic set
    ds = split_dataset(str(synth_shards), "train", 32, 1, True, "none", rates)
    for _ in range(2):
        labels = np.concatenate([b["label"] for b in ds.iter_batches(batch_size=16, batch_format="numpy")])
        assert np.bincount(labels, minlength=7).tolist() == [120, 0, 40, 40, 40, 40, 40]


def test_cached_split_cut_into_blocks_the_shuffle_takes_whole(ray_cluster, synth_shards) -> None:
    import ray

    from fer_ray.data import cut_blocks, largest_block

    ds = ray.data.read_parquet(str(synth_shards / "train")).materialize()
    cut = cut_blocks(ds, 5)
    sizes = [meta.size_bytes for bundle in cut.iter_internal_ref_bundles() for meta in bundle.metadata]
    assert len(sizes) == 5 and max(sizes) <= 1.3 * ds.size_bytes() / 5
    assert largest_block(cut) == max(sizes)
    assert sorted(cut.to_pandas()["path"]) == sorted(ds.to_pandas()["path"])  # every row once


def test_training_block_target_leaves_the_shuffle_quiet() -> None:
    """Ray warns in every epoch about shuffle input blocks above 1.5x the block target."""
    from ray.data.context import MAX_SAFE_BLOCK_SIZE_FACTOR

    from fer_ray.data import MIN_BLOCK_BYTES, train_block_bytes

    assert train_block_bytes(48, 1) == MIN_BLOCK_BYTES
    assert train_block_bytes(224, 3) == 256 * (224 * 224 * 3 + 8)
    for block in (3_000_000, 5_723_000, 40_000_000):
        assert MAX_SAFE_BLOCK_SIZE_FACTOR * train_block_bytes(48, 1, block) > 1.2 * block


def test_cached_training_split_shuffles_in_one_block_per_cpu(ray_cluster, synth_shards, capsys) -> None:
    """One all-to-all exchange per epoch, with as many blocks out as in (one per CPU): no
    repartition after the shuffle."""
    import ray

    import fer_ray.data as data

    ds = data.split_dataset(str(synth_shards), "train", 32, 1, True, "none")
    ds.explain()
    logical = capsys.readouterr().out.split("-------- Logical Plan (Optimized)")[0]
    assert "RandomShuffle" in logical and "Repartition" not in logical  # the root is printed first
    shuffled = list(ds.iter_batches(batch_size=None, batch_format="numpy"))
    assert sorted(np.concatenate([b["label"] for b in shuffled])) == sorted(
        ray.data.read_parquet(str(synth_shards / "train")).to_pandas()["label"])


def test_cached_training_split_blocks_follow_the_cpus_above_a_floor() -> None:
    from fer_ray.data import MIN_BLOCK_BYTES, shuffle_blocks

    assert shuffle_blocks(22 * MIN_BLOCK_BYTES, 4) == 4  # FER2013's train split (22 MB), 4 CPUs
    assert shuffle_blocks(22 * MIN_BLOCK_BYTES, 64) == 22  # a cluster: blocks of 1 MiB at least
    assert shuffle_blocks(MIN_BLOCK_BYTES // 3, 4) == 2
    assert shuffle_blocks(10 * MIN_BLOCK_BYTES, 1) == 2


def test_eval_data_keeps_every_image_once(ray_cluster, synth_shards) -> None:
    from fer_ray.data import split_dataset

    ds = split_dataset(str(synth_shards), "val", 32, 1, False)
    batches = list(ds.iter_batches(batch_size=32, batch_format="numpy"))
    assert sum(len(b["label"]) for b in batches) == 70
    assert all(b["image"].shape[1:] == (32, 32, 1) and b["image"].dtype == np.uint8 for b in batches)


def test_the_training_shuffle_counts_the_cpus_an_autoscaler_may_bring_up(monkeypatch) -> None:
    """Counted on the nodes up when the dataset was built, a cold cluster.yaml cluster (a
    head of no CPUs, one GPU worker's 4) cut the training data into 4 blocks for the whole
    run, though Ray Data brings up CPU workers of 16 each for the augmentation."""
    import ray

    import fer_ray.cli
    from fer_ray.data import shuffle_parallelism

    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 4.0, "GPU": 1.0})
    monkeypatch.setattr(fer_ray.cli, "autoscaler_limits", lambda: {"CPU": 48.0, "GPU": 4.0})
    assert shuffle_parallelism() == 48
    monkeypatch.setattr(fer_ray.cli, "autoscaler_limits", lambda: None)  # a fixed cluster, or a laptop
    assert shuffle_parallelism() == 4
    monkeypatch.setattr(ray, "cluster_resources", lambda: {})
    assert shuffle_parallelism() == 2


def test_training_images_stream_in_blocks_of_one_map_batch(ray_cluster, synth_shards, monkeypatch) -> None:
    """Each map batch leaves as its own block, so the loop gets its first batch as soon as
    one is made, not once a task has transformed its whole share of the split."""
    import fer_ray.data as data

    monkeypatch.setattr(data, "MAP_BATCH_SIZE", 16)
    monkeypatch.setattr(data, "MIN_BLOCK_BYTES", 1)
    monkeypatch.setattr(data, "SHUFFLE_BLOCK_FACTOR", 1e9)  # the synthetic split's 4 blocks are ~70 images
    ds = data.split_dataset(str(synth_shards), "train", 32, 1, True, "none").materialize()
    sizes = [len(b["label"]) for b in ds.iter_batches(batch_size=None, batch_format="numpy")]
    assert sum(sizes) == 280
    # About a map batch each (Ray slices at the byte target); 4 blocks of 70 rows without it.
    assert max(sizes) < 2 * 16 and len(sizes) >= 280 // 24


def test_shards_read_every_row_without_ray_datas_footer_actors(ray_cluster, synth_shards, monkeypatch) -> None:
    import pandas as pd
    import ray

    from fer_ray.data import read_shards

    ctx = ray.data.DataContext.get_current()
    # (set here: a switch an earlier test's read left changed would compare equal to itself)
    monkeypatch.setattr(ctx, "use_datasource_v2", True)
    monkeypatch.setattr(ctx, "enable_progress_bars", True)
    ds = read_shards(str(synth_shards / "train")).materialize()
    assert (ctx.use_datasource_v2, ctx.enable_progress_bars) == (True, True)  # the switches are the call's own
    stats = ds.stats()
    # The V1 reader: one ReadParquet stage, not V2's ListFiles (32 footer-reader actors) + ReadFiles.
    assert "ReadParquet" in stats and "ListFiles" not in stats
    expected = pd.read_parquet(synth_shards / "train", columns=["path", "label"])
    got = ds.select_columns(["path", "label"]).to_pandas()
    assert sorted(zip(got["path"], got["label"])) == sorted(zip(expected["path"], expected["label"]))
