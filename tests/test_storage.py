"""fer_ray.storage on a filesystem that, like S3 and GCS in pyarrow, renames files but no folders."""

from __future__ import annotations

import io

import json
import os
from pathlib import Path

import pyarrow.fs as pafs
import pytest

from fer_ray import prepare, storage
from fer_ray.config import ConfigError
from fer_ray.constants import MANIFEST_FILE
from fer_ray.predict import SUMMARY_FILE, _publish


class FolderlessHandler(pafs.FileSystemHandler):
    """The local disk, except that moving a folder fails as on an object store; every
    copy is recorded in order."""

    def __init__(self) -> None:
        self.local = pafs.LocalFileSystem()
        self.copies: list[str] = []

    def move(self, src, dest):
        if self.local.get_file_info(src).type == pafs.FileType.Directory:
            raise OSError(f"cannot move folder {src!r} on this filesystem")
        self.local.move(src, dest)

    def copy_file(self, src, dest):
        self.copies.append(dest)
        self.local.copy_file(src, dest)

    def get_type_name(self):
        return "folderless"

    def equals(self, other):
        return self is other

    def normalize_path(self, path):
        return path

    def get_file_info(self, paths):
        return self.local.get_file_info(paths)

    def get_file_info_selector(self, selector):
        return self.local.get_file_info(selector)

    def create_dir(self, path, recursive):
        self.local.create_dir(path, recursive=recursive)

    def delete_dir(self, path):
        self.local.delete_dir(path)

    def delete_dir_contents(self, path, missing_dir_ok=False):
        self.local.delete_dir_contents(path, missing_dir_ok=missing_dir_ok)

    def delete_root_dir_contents(self):
        raise OSError("not here")

    def delete_file(self, path):
        self.local.delete_file(path)

    def open_input_stream(self, path):
        return self.local.open_input_stream(path)

    def open_input_file(self, path):
        return self.local.open_input_file(path)

    def open_output_stream(self, path, metadata):
        return self.local.open_output_stream(path, metadata=metadata)

    def open_append_stream(self, path, metadata):
        return self.local.open_append_stream(path, metadata=metadata)


@pytest.fixture
def folderless(monkeypatch) -> FolderlessHandler:
    handler = FolderlessHandler()
    fs = pafs.PyFileSystem(handler)
    monkeypatch.setattr(storage, "resolve", lambda path: (fs, storage.normalize(path)))
    return handler


def _tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): p.read_text() for p in sorted(root.rglob("*")) if p.is_file()}


def _folder(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root


def test_a_folder_is_copied_with_the_named_file_last_and_the_source_removed(folderless, tmp_path) -> None:
    files = {"summary.json": "{}", "a.parquet": "1", "predictions/p-0.parquet": "2", "predictions/p-1.parquet": "3"}
    src = _folder(tmp_path / "src", files)

    storage.move(str(src), str(tmp_path / "dst"), last="summary.json")

    assert _tree(tmp_path / "dst") == files
    assert not src.exists()
    assert folderless.copies[-1] == str(tmp_path / "dst" / "summary.json")
    assert len(folderless.copies) == len(files)


def test_a_file_and_an_empty_folder_move_too(folderless, tmp_path) -> None:
    (tmp_path / "f.txt").write_text("x")
    (tmp_path / "empty").mkdir()

    storage.move(str(tmp_path / "f.txt"), str(tmp_path / "g.txt"))
    storage.move(str(tmp_path / "empty"), str(tmp_path / "moved"))

    assert (tmp_path / "g.txt").read_text() == "x" and not (tmp_path / "f.txt").exists()
    assert (tmp_path / "moved").is_dir() and not (tmp_path / "empty").exists()
    assert folderless.copies == []  # a file moves by the filesystem's own move


def test_scoring_output_replaced_on_a_filesystem_without_folder_moves(folderless, tmp_path) -> None:
    out = _folder(tmp_path / "out", {SUMMARY_FILE: "old", "predictions/p.parquet": "old"})
    tmp = _folder(tmp_path / "out.tmp-1", {SUMMARY_FILE: "new", "predictions/p.parquet": "new", "metrics.parquet": "m"})

    _publish(str(tmp), str(out))

    assert _tree(out) == {SUMMARY_FILE: "new", "predictions/p.parquet": "new", "metrics.parquet": "m"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no .tmp- or .old- folder left
    assert folderless.copies[-1] == str(out / SUMMARY_FILE)


def test_shards_republished_on_a_filesystem_without_folder_moves(folderless, tmp_path) -> None:
    out = _folder(tmp_path / "shards", {MANIFEST_FILE: "{}", "train/old.parquet": "old", "test/old.parquet": "old"})
    staging = _folder(tmp_path / "staging", {"train/part-0.parquet": "t", "val/part-0.parquet": "v"})

    prepare._publish(str(staging), str(out), ["train", "val"], {"splits": ["train", "val"]})

    assert _tree(out) == {
        MANIFEST_FILE: json.dumps({"splits": ["train", "val"]}, indent=2) + "\n",
        "train/part-0.parquet": "t",
        "val/part-0.parquet": "v",
    }


def test_local_folders_still_move_by_rename(tmp_path) -> None:
    src = _folder(tmp_path / "src", {"a": "1"})
    inode = (src / "a").stat().st_ino

    storage.move(str(src), str(tmp_path / "dst"))

    assert (tmp_path / "dst" / "a").stat().st_ino == inode


@pytest.fixture
def bucket(monkeypatch) -> pafs.FileSystem:
    """An in-memory object store behind mock:// URIs that, like S3's, keep the bucket as the
    first part of the path (pyarrow's own mock:// drops it)."""
    fs = pafs._MockFileSystem()

    def from_uri(uri: str):
        _, inner = pafs.FileSystem.from_uri("mock:///" + uri.split("://", 1)[1])  # parses and decodes
        return fs, inner

    monkeypatch.setattr(storage, "_from_uri", from_uri)
    return fs


@pytest.fixture
def endpoint_bucket(bucket, monkeypatch) -> pafs.FileSystem:
    """The in-memory store behind an S3-compatible endpoint (MinIO and the like): a URI that
    lost its ?endpoint_override= on the way would be sent to AWS, and fails here as it would
    there (the store above answered every mock:// URI, options or not)."""
    answer = storage._from_uri

    def from_uri(uri: str):
        if "endpoint_override=" not in uri:
            raise OSError(f"{uri!r}: no endpoint (would resolve on AWS)")
        return answer(uri)

    monkeypatch.setattr(storage, "_from_uri", from_uri)
    return bucket


ENDPOINT = "?endpoint_override=127.0.0.1:9000&scheme=http"


def test_scoring_behind_an_endpoint_keeps_its_options_everywhere(endpoint_bucket) -> None:
    """Found against a real S3-compatible server: scoring failed before it began (its look
    for an interrupted run's leftovers listed the output's parent without the options), a
    TGA file read as no image (its extension taken from after the '?'), and the names
    derived from URIs carried the options."""
    from PIL import Image

    from fer_ray.predict import _stale_temp_folders, decode_files

    for name in ("my preds.tmp-1a2b3c4d", "my preds.old-5e6f7a8b", "other.tmp-00000000"):
        endpoint_bucket.create_dir(f"bucket/out/{name}")
    found = _stale_temp_folders("mock://bucket/out/my%20preds" + ENDPOINT)
    assert sorted(storage.name_of(f) for f in found) == ["my preds.old-5e6f7a8b", "my preds.tmp-1a2b3c4d"]
    assert all(f.endswith(ENDPOINT) and storage.is_dir(f) for f in found)

    endpoint_bucket.create_dir("bucket/faces")
    tga = io.BytesIO()
    Image.new("L", (20, 20), 200).save(tga, format="TGA")  # no signature: known by its name
    with endpoint_bucket.open_output_stream("bucket/faces/a face.tga") as f:
        f.write(tga.getvalue())
    images, keep, bad, reasons = decode_files(["mock://bucket/faces/a%20face.tga" + ENDPOINT], None, 16, 1)
    assert keep == [0] and not bad, reasons
    assert storage.name_of("mock://bucket/faces/a%20face.tga" + ENDPOINT) == "a face.tga"
    assert storage.name_of("/local/my%20preds") == "my%20preds"  # a local name is as it is


def test_a_config_file_in_a_bucket_is_read(endpoint_bucket) -> None:
    """`--config RUN/config.json` resumes or retrains RUN; with RUN on a bucket the file was
    looked for on the local disk (pathlib also collapsed the URI's //)."""
    from fer_ray.config import ConfigError, TrainConfig, load_config_file

    endpoint_bucket.create_dir("bucket/run")
    with endpoint_bucket.open_output_stream("bucket/run/config.json") as f:
        f.write(b'{"optim": {"lr": 0.02}, "model": {"model": "resnet18"}}')
    values = load_config_file("mock://bucket/run/config.json" + ENDPOINT, TrainConfig)
    assert values["lr"] == 0.02 and values["model"] == "resnet18"
    with pytest.raises(ConfigError, match="does not exist"):
        load_config_file("mock://bucket/run/nope.json" + ENDPOINT, TrainConfig)


def test_keys_with_spaces_percent_hash_and_accents_are_listed_and_read_back(bucket) -> None:
    from fer_ray.constants import FER_CLASSES
    from fer_ray.prepare import _files_by_class
    from fer_ray.predict import list_images

    keys = ["faces/happy/my photo.png", "faces/sad/100%.png", "faces/sad/a#b.png", "faces/happy/ünï.png"]
    for key in keys:
        bucket.create_dir("bucket/" + key.rsplit("/", 1)[0])
        with bucket.open_output_stream("bucket/" + key) as f:
            f.write(key.encode())
    source = "mock://bucket/faces?region=somewhere"  # options (S3's endpoint_override) stay on every path

    listing = list_images(source, FER_CLASSES)
    paths, labels = listing.column("path").to_pylist(), listing.column("label").to_pylist()

    assert sorted(storage.read_bytes(p).decode() for p in paths) == sorted(keys)
    assert all(p.endswith("?region=somewhere") for p in paths)
    assert {storage.read_bytes(p).decode().split("/")[1]: FER_CLASSES[lab] for p, lab in zip(paths, labels)} == {
        "happy": "happy", "sad": "sad"}
    items = _files_by_class(source, ["happy", "sad"])
    assert sorted(storage.read_bytes(p).decode() for p, _ in items) == sorted(keys)


def test_prepare_refuses_shards_inside_a_bucket_source_as_it_does_local_ones(bucket) -> None:
    from fer_ray.config import ConfigError
    from fer_ray.prepare import prepare

    bucket.create_dir("bucket/faces/happy")
    with bucket.open_output_stream("bucket/faces/happy/a.png") as f:
        f.write(b"x")
    with pytest.raises(ConfigError, match="--output 'mock://bucket/faces/shards' is inside --source"):
        prepare("mock://bucket/faces", "mock://bucket/faces/shards")
    assert [i.path for i in bucket.get_file_info(pafs.FileSelector("bucket/faces"))] == ["bucket/faces/happy"]


@pytest.mark.parametrize("path, folder, expected", [
    ("file:///data/faces/out", "/data/faces", True),  # a local path and its file:// URI
    ("/data/faces/out", "file:///data/faces/", True),
    ("file:///data/my%20faces/out", "/data/my faces", True),
    ("s3://b/faces/out?endpoint_override=h:9000", "s3://b/faces?endpoint_override=h:9000", True),
    ("s3://b/faces/out", "s3://b/faces?region=eu-west-1", True),
    ("s3://b/faces2", "s3://b/faces", False),
    ("/data/faces2", "file:///data/faces", False),
    ("gs://b/faces/out", "s3://b/faces", False),
])
def test_inside_sees_one_place_under_two_spellings(path, folder, expected) -> None:
    """Output-inside-input checks compared the strings: file:// against a plain path, or a
    URI with ?options against one without, let an output inside its input through."""
    assert storage.inside(path, folder) is expected


def test_same_place_takes_a_folder_under_its_spellings(tmp_path) -> None:
    d = str(tmp_path / "shards")
    assert storage.same_place(d, f"file://{d}/") and storage.same_place(f"file://{d}", d + "/")
    assert storage.same_place("s3://b/x/?endpoint_override=h:9000", "s3://b/x?endpoint_override=h:9000")
    assert storage.normalize("s3://b/x/?region=eu") == "s3://b/x?region=eu"
    assert not storage.same_place("s3://b/x?endpoint_override=h:9000", "s3://b/x?endpoint_override=g:9000")
    assert not storage.same_place(d, d + "2") and not storage.same_place("s3://b/x", "gs://b/x")


def test_listed_paths_keep_an_hdfs_host_and_port() -> None:
    from types import SimpleNamespace

    hdfs, s3 = SimpleNamespace(type_name="hdfs"), SimpleNamespace(type_name="s3")
    assert storage.full_path(hdfs, "/user/me/faces/a b.png", "hdfs://namenode:8020/user/me/faces?replication=1") == (
        "hdfs://namenode:8020/user/me/faces/a%20b.png?replication=1")
    assert storage.full_path(hdfs, "/faces/a.png", "hdfs:///faces") == "hdfs:///faces/a.png"  # the default namenode
    assert storage.full_path(s3, "bucket/faces/a.png", "s3://bucket/faces") == "s3://bucket/faces/a.png"
    # pyarrow calls its Google Cloud Storage "gcs": a gs:// folder's files came back gcs://.
    gcs = SimpleNamespace(type_name="gcs")
    assert storage.full_path(gcs, "bucket/faces/a.png", "gs://bucket/faces") == "gs://bucket/faces/a.png"
    assert storage.full_path(gcs, "bucket/faces/a.png", "gcs://bucket/faces") == "gcs://bucket/faces/a.png"


def test_uri_joins_keep_the_options_last_and_bad_uris_are_named() -> None:
    from fer_ray.config import ConfigError

    assert storage.join("s3://b/shards?endpoint_override=h:9000", "train", "part.parquet") == (
        "s3://b/shards/train/part.parquet?endpoint_override=h:9000")
    assert storage.join("s3://b/shards/", "train") == "s3://b/shards/train"
    with pytest.raises(ConfigError, match="percent-encode spaces"):
        storage.resolve("s3://bucket/my photos")


def test_a_name_that_is_not_utf8_is_named_in_one_sentence(tmp_path) -> None:
    """pyarrow cannot decode such a name: listing ended in a bare UnicodeDecodeError that
    named neither the file nor the folder (a zip made on Windows, say)."""
    from fer_ray.config import ConfigError

    (tmp_path / "happy").mkdir()
    (tmp_path / "happy" / "ok.png").write_bytes(b"x")
    open(os.path.join(os.fsencode(tmp_path / "happy"), b"caf\xe9.png"), "wb").close()
    for listing in (storage.list_files, lambda p: storage.list_dir(os.path.join(p, "happy"))):
        with pytest.raises(ConfigError, match=r"happy/caf\ufffd\.png' has a name that is not UTF-8"):
            listing(str(tmp_path))
    assert [e.base_name for e in storage.list_dir(str(tmp_path))] == ["happy"]


def test_a_uri_with_a_hash_is_refused_and_its_percent_encoding_works(tmp_path) -> None:
    """pyarrow reads `#...` as a URI fragment and drops it: file:///x/exp#3 was /x/exp, and
    so were the OUT.tmp-<id> and .staging-<id> folders named from it (prepare's clean-up
    then deleted the folder it had just written)."""
    from fer_ray.config import ConfigError

    (tmp_path / "exp#3").mkdir()
    (tmp_path / "exp#3" / "a.txt").write_text("x")
    for bad in (f"file://{tmp_path}/exp#3", "s3://bucket/shards#2", f"file://{tmp_path}/exp#3/preds"):
        with pytest.raises(ConfigError, match="percent-encode it as %23"):
            storage.resolve(bad)
        with pytest.raises(ConfigError, match="percent-encode it as %23"):
            storage.exists(storage.join(storage.sibling(bad, ".tmp-1"), "predictions"))
    fs, inner = storage.resolve(f"file://{tmp_path}/exp%233")
    assert inner == f"{tmp_path}/exp#3" and storage.exists(f"file://{tmp_path}/exp%233/a.txt")
    assert storage.exists(str(tmp_path / "exp#3" / "a.txt"))  # a local path is no URI: # is a name


def test_a_path_given_that_is_not_utf8_is_named_in_one_sentence(tmp_path) -> None:
    """A name from the command line on a Latin-1 file system (surrogate escapes in Python)
    ended in pyarrow's UnicodeEncodeError, a traceback."""
    from fer_ray.config import ConfigError

    folder = os.fsdecode(os.path.join(os.fsencode(tmp_path), b"caf\xe9"))
    os.mkdir(folder)
    for call in (storage.exists, storage.resolve, lambda p: storage.list_files(p)):
        with pytest.raises(ConfigError, match=r"caf\ufffd' has a name that is not UTF-8"):
            call(folder)
    with pytest.raises(ConfigError, match=r"has a name that is not UTF-8"):  # a lone surrogate (JSON "\ud83d")
        storage.exists("/tmp/a\ud83db")


def test_a_sibling_folder_keeps_a_uris_options_at_the_end(tmp_path) -> None:
    """Scoring's OUT.tmp-<id> was appended to the whole string, inside the ?options."""
    assert storage.sibling("s3://b/preds?endpoint_override=h:9000", ".tmp-1") == \
        "s3://b/preds.tmp-1?endpoint_override=h:9000"
    assert storage.sibling("s3://b/preds/", ".old-2") == "s3://b/preds.old-2"
    assert storage.sibling(str(tmp_path / "out") + "/", ".tmp-3") == str(tmp_path / "out.tmp-3")


def test_class_folders_with_spaces_percent_or_hash_in_a_bucket_are_listed(bucket) -> None:
    """prepare joined a listed class folder's name to the URI as it is; a space, % or #
    made the URI unparsable (or another key) and the job ended telling the user to
    percent-encode a name they never typed."""
    from fer_ray.prepare import list_source

    for key in ["faces/train/very happy/a.png", "faces/train/100% sad/b.png", "faces/train/a#b/c.png",
                "faces/val/very happy/d.png", "faces/val/100% sad/e.png", "faces/val/a#b/f.png"]:
        bucket.create_dir("bucket/" + key.rsplit("/", 1)[0])
        with bucket.open_output_stream("bucket/" + key) as f:
            f.write(key.encode())
    listing = list_source("mock://bucket/faces?region=somewhere")
    assert sorted(listing.classes) == ["100% sad", "a#b", "very happy"]
    read = {split: sorted((storage.read_bytes(p).decode(), listing.classes[lab]) for p, lab in items)
            for split, items in listing.items.items()}
    assert read["train"] == [("faces/train/100% sad/b.png", "100% sad"), ("faces/train/a#b/c.png", "a#b"),
                             ("faces/train/very happy/a.png", "very happy")]
    assert len(read["val"]) == 3


def test_a_bucket_input_is_checked_for_files_without_listing_every_key(bucket, monkeypatch) -> None:
    """The check for an empty input listed every key of the input (a second full listing
    of a bucket of millions, before list_images made the one it needs)."""
    from fer_ray import predict

    for key in ["photos/a/b/c.png", "photos/z/.hidden.png"]:
        bucket.create_dir("bucket/" + key.rsplit("/", 1)[0])
        with bucket.open_output_stream("bucket/" + key) as f:
            f.write(b"x")
    bucket.create_dir("bucket/empty/sub")
    monkeypatch.setattr(storage, "list_files", lambda *a, **k: pytest.fail("listed every key"))
    assert predict._has_any_file("mock://bucket/photos?region=somewhere")
    assert not predict._has_any_file("mock://bucket/empty")
    assert not predict._has_any_file("mock://bucket/photos/z")  # hidden files are not listed


def test_a_split_folder_of_shards_in_a_bucket_is_found_with_the_uris_options(bucket) -> None:
    """`--input s3://b/shards/val?endpoint_override=...` was split at its last '/' with the
    options still on: the shards went unrecognised and were scored as images."""
    import json

    from fer_ray.predict import find_shards

    bucket.create_dir("bucket/shards/val")
    with bucket.open_output_stream("bucket/shards/manifest.json") as f:
        f.write(json.dumps({"classes": ["a", "b"], "splits": {"val": {"total": 1}}}).encode())
    with bucket.open_output_stream("bucket/shards/val/part-0.parquet") as f:
        f.write(b"x")
    assert find_shards("mock://bucket/shards/val?region=x") == ("mock://bucket/shards?region=x", "val")
    assert find_shards("mock://bucket/shards?region=x") == ("mock://bucket/shards?region=x", None)
    assert storage.split_last("s3://bucket") == ("", "bucket")
    assert storage.split_last("/data/shards/val") == ("/data/shards", "val")


def test_scoring_into_a_bucket_root_is_refused(monkeypatch) -> None:
    """The output is written beside itself under a temporary name, which beside a bucket
    is another bucket (s3://bucket.tmp-1a2b3c4d)."""
    from fer_ray.config import ConfigError
    from fer_ray.predict import _check_output

    for output in ("s3://bucket", "s3://bucket/", "gs://bucket?endpoint_override=h:9000"):
        with pytest.raises(ConfigError, match="is a bucket; give a folder inside it"):
            _check_output("/models/best", "/data/faces", output)
    assert storage.split_last("s3://bucket/preds?x=1") == ("s3://bucket?x=1", "preds")
    # A folder at the root of the machine is not a bucket (its parent was "" as a bucket's);
    # nothing is made at the root (whether / is writable here is not the question).
    monkeypatch.setattr(storage, "check_creatable", lambda path, flag: None)
    monkeypatch.setattr(storage, "exists", lambda path: False)
    assert _check_output("/models/best", "/data/faces", "file:///preds") is None


def test_a_uri_with_no_bucket_is_refused_not_taken_for_a_local_folder() -> None:
    """s3://$BUCKET/$RUN with both unset was the relative local folder "s3:"."""
    from fer_ray.config import ConfigError

    for path in ("s3://", "gs:///", "s3://?region=eu"):
        with pytest.raises(ConfigError, match="names no bucket or folder; give one, e.g. s3://BUCKET/FOLDER"):
            storage.resolve(path)
    assert storage.normalize("s3://b") == "s3://b" and storage.normalize("file:///") == "file:///"


def test_a_refused_uri_gets_the_advice_that_fits_it() -> None:
    """s3:///shards (s3://$BUCKET/shards, the variable unset) and file://runs/x (a relative
    folder meant) were told to percent-encode their spaces."""
    from fer_ray.config import ConfigError

    for path in ("s3:///shards/fer2013", "gs:///runs/a"):
        with pytest.raises(ConfigError, match=r"names no bucket after (s3|gs):// \(an unset variable\?\)"):
            storage.resolve(path)
    with pytest.raises(ConfigError, match=r"a local file URI is file:///ABSOLUTE/PATH \(three slashes\)"):
        storage.resolve("file://runs/sweep")
    for path in ("s3://my bucket/x", "file:///tmp/my faces"):
        with pytest.raises(ConfigError, match="percent-encode spaces"):
            storage.resolve(path)


def test_a_link_back_up_is_not_followed_and_a_link_to_nothing_is_listed(tmp_path, caplog) -> None:
    """pyarrow's listing followed a link to a folder above it 40 links deep, listing every
    file under it once per turn, and left a link to nothing out without a word; links to
    other folders are still followed, and a pipe is not listed (reading it waits forever)."""
    root = tmp_path / "src"
    (root / "happy" / "deep").mkdir(parents=True)
    (root / "happy" / "a.png").write_bytes(b"a")
    (root / "happy" / "deep" / "b.png").write_bytes(b"b")
    (root / "happy" / "deep" / "up").symlink_to(root / "happy", target_is_directory=True)
    (root / "happy" / "top").symlink_to(root, target_is_directory=True)
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "x.png").write_bytes(b"x")
    (root / "sad").symlink_to(tmp_path / "elsewhere", target_is_directory=True)  # followed
    (root / "happy" / "gone.png").symlink_to(tmp_path / "deleted.png")
    os.mkfifo(root / "happy" / "pipe.png")
    (root / "happy" / "self.png").symlink_to(root / "happy" / "self.png")  # a link loop: listed,
    (root / "happy" / "x.png").symlink_to(root / "happy" / "y.png")  # its reader says why
    (root / "happy" / "y.png").symlink_to(root / "happy" / "x.png")
    (root / "happy" / "outside").symlink_to(tmp_path, target_is_directory=True)  # above the root
    (root / ".hidden").mkdir()
    (root / ".hidden" / "c.png").write_bytes(b"c")

    with caplog.at_level("WARNING", logger="fer_ray.storage"):
        listed = storage.list_files(str(root))
    assert listed == [
        str(root / p) for p in ("happy/a.png", "happy/deep/b.png", "happy/gone.png", "happy/self.png",
                                "happy/x.png", "happy/y.png", "sad/x.png")
    ]
    loops = sorted(r.getMessage().split()[0] for r in caplog.records)
    assert loops == [str(root / "happy" / p) for p in ("deep/up", "outside", "top")]


def test_an_output_under_a_link_to_nothing_cannot_be_made(tmp_path) -> None:
    """exists() is False for a link to nothing: the check let it through, and making the
    folder failed later with a traceback."""
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    for path in (tmp_path / "dangling", tmp_path / "dangling" / "x"):
        with pytest.raises(ConfigError, match=r"is a link to .*nowhere', which does not exist"):
            storage.check_creatable(str(path), "--output")
    storage.check_creatable(str(tmp_path / "new" / "x"), "--output")
    assert not (tmp_path / "new").exists()  # checked without leaving anything


def test_the_folders_a_job_made_are_removed_when_empty_up_to_the_first_that_is_not(tmp_path) -> None:
    out = tmp_path / "new" / "a" / "b"
    made = storage.missing_folders(str(out))
    assert made == [str(out), str(out.parent), str(tmp_path / "new")]
    out.mkdir(parents=True)
    (tmp_path / "new" / "keep.txt").write_text("x")  # something else put a file there meanwhile
    storage.remove_empty(made)
    assert not (tmp_path / "new" / "a").exists() and (tmp_path / "new" / "keep.txt").exists()
    assert storage.missing_folders(str(tmp_path)) == []


def test_inside_follows_links_to_where_they_lead(tmp_path) -> None:
    """An input reached through a link that lies inside the output was not "inside" it by
    its spelling, and a run replacing the output deleted it."""
    (tmp_path / "out" / "photos").mkdir(parents=True)
    (tmp_path / "photolink").symlink_to(tmp_path / "out" / "photos")
    (tmp_path / "outlink").symlink_to(tmp_path / "out")
    assert storage.inside(str(tmp_path / "photolink"), str(tmp_path / "out"))
    assert storage.inside(str(tmp_path / "out" / "new"), str(tmp_path / "outlink"))  # the link's folder
    assert storage.inside(str(tmp_path / "outlink" / "x"), str(tmp_path / "out"))
    assert not storage.inside(str(tmp_path / "out"), str(tmp_path / "photolink"))
    assert storage.through_link(str(tmp_path / "outlink")) == str(tmp_path / "out")
    assert storage.through_link(str(tmp_path / "out")) == str(tmp_path / "out")
    assert storage.through_link("s3://b/out") == "s3://b/out"


def test_a_folder_inside_that_cannot_be_listed_is_named_and_left_out(tmp_path, monkeypatch, caplog) -> None:
    """One folder without permission stopped the listing of everything (scoring or
    preparing a large folder ended in one sentence); the folder itself still does."""
    for name in ("a/1.png", "locked/2.png", "b/3.png"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    real_scandir = os.scandir

    def scandir(path):
        if str(path).endswith("locked"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    with caplog.at_level("WARNING", logger="fer_ray.storage"):
        found = sorted(storage.local_files(str(tmp_path)))
    assert found == [str(tmp_path / "a" / "1.png"), str(tmp_path / "b" / "3.png")]
    assert f"Cannot list the folder {tmp_path / 'locked'} (Permission denied); its files are left out" in caplog.text
    with pytest.raises(ConfigError, match="Cannot list the folder .*locked.*: Permission denied"):
        list(storage.local_files(str(tmp_path / "locked")))


def test_a_link_to_a_skipped_folder_is_not_listed(tmp_path, caplog) -> None:
    """A link inside a job's input to its output: the next run read the last one's results
    as input. A link to a folder given to skip, or into one, is not followed."""
    (tmp_path / "src" / "happy").mkdir(parents=True)
    (tmp_path / "src" / "happy" / "1.png").write_bytes(b"x")
    (tmp_path / "out" / "predictions").mkdir(parents=True)
    (tmp_path / "out" / "predictions" / "part-0.parquet").write_bytes(b"x")
    (tmp_path / "src" / "results").symlink_to(tmp_path / "out", target_is_directory=True)
    (tmp_path / "src" / "preds").symlink_to(tmp_path / "out" / "predictions", target_is_directory=True)

    assert len(storage.list_files(str(tmp_path / "src"))) == 3
    with caplog.at_level("WARNING", logger="fer_ray.storage"):
        found = storage.list_files(str(tmp_path / "src"), skip=[str(tmp_path / "out"), str(tmp_path / "gone")])
    assert found == [str(tmp_path / "src" / "happy" / "1.png")]
    assert f"{tmp_path / 'src' / 'results'} leads into {tmp_path / 'out'}; not listed" in caplog.text
    assert f"{tmp_path / 'src' / 'preds'} leads into {tmp_path / 'out'}; not listed" in caplog.text
    # A link to a folder above the skipped one: the skipped folder is then reached as a plain
    # subfolder of the link's (the last run's confusion_matrix.png was scored as input).
    mnt = tmp_path / "mnt"
    (mnt / "faces" / "sad").mkdir(parents=True)
    (mnt / "faces" / "sad" / "2.png").write_bytes(b"x")
    (mnt / "preds" / "predictions").mkdir(parents=True)
    (mnt / "preds" / "confusion_matrix.png").write_bytes(b"x")
    (tmp_path / "src2").mkdir()
    (tmp_path / "src2" / "data").symlink_to(mnt, target_is_directory=True)
    with caplog.at_level("WARNING", logger="fer_ray.storage"):
        found = storage.list_files(str(tmp_path / "src2"), skip=[str(mnt / "preds")])
    assert found == [str(tmp_path / "src2" / "data" / "faces" / "sad" / "2.png")]
    assert f"{tmp_path / 'src2' / 'data' / 'preds'} leads into {mnt / 'preds'}; not listed" in caplog.text


def test_a_runs_outputs_reach_a_bucket_with_summary_json_last(bucket, monkeypatch) -> None:
    """Copied into a bucket in no set order, a finalize cut short could leave summary.json (a
    finished run's mark, the old one too on a rerun) beside half a best/."""
    import os

    from fer_ray import trainer

    bucket.create_dir("b/run")
    with bucket.open_output_stream("b/run/summary.json") as f:  # a previous finalize's
        f.write(b'{"accuracy": 0.1}')
    copies, copy_dir = [], storage.copy_dir

    def watched(src, dst):
        copies.append((sorted(os.listdir(src)), storage.exists("mock://b/run/summary.json")))
        copy_dir(src, dst)

    monkeypatch.setattr(storage, "copy_dir", watched)
    with trainer.local_staging("mock://b/run", last="summary.json") as local:
        os.makedirs(os.path.join(local, "best"))
        for name in ("best/model.safetensors", "history.csv", "summary.json"):
            with open(os.path.join(local, name), "w") as f:
                f.write("new")
    assert copies == [(["best", "history.csv"], False), (["summary.json"], False)]
    assert storage.read_bytes("mock://b/run/summary.json") == b"new"
    assert storage.read_bytes("mock://b/run/best/model.safetensors") == b"new"


def test_a_local_runs_outputs_rewritten_and_cut_short_leave_no_summary_json(tmp_path) -> None:
    """A local run folder is written in place: a rerun's finalize cut short (Ctrl-C while
    best/ was copied) kept the old summary.json, a finished run's mark, beside the new half."""
    import os

    from fer_ray import trainer

    (tmp_path / "summary.json").write_text('{"accuracy": 0.1}')
    with pytest.raises(KeyboardInterrupt):
        with trainer.local_staging(str(tmp_path), last="summary.json") as local:
            assert local == str(tmp_path)
            with open(os.path.join(local, "history.csv"), "w") as f:
                f.write("new")
            raise KeyboardInterrupt
    assert sorted(p.name for p in tmp_path.iterdir()) == ["history.csv"]


def test_a_fer_csv_behind_an_endpoint_is_read_as_a_csv(endpoint_bucket) -> None:
    """The options after '?' hid the .csv extension: "is a file but not a .csv". The CSV also
    begins with a byte-order mark, as Excel saves it, which hid the first column's name."""
    from fer_ray.prepare import list_source

    rows = "".join(f"{i % 7},{' '.join(['0'] * 4)},{usage}\n" for i, usage in enumerate(["Training"] * 3 + ["PublicTest"]))
    endpoint_bucket.create_dir("bucket/data")
    with endpoint_bucket.open_output_stream("bucket/data/fer2013.csv") as f:
        f.write(("\ufeffemotion,pixels,Usage\n" + rows).encode("utf-8"))

    listing = list_source("mock://bucket/data/fer2013.csv" + ENDPOINT)

    assert listing.kind == "csv" and {s: sum(c["rows"] for c in chunks) for s, chunks in listing.csv_chunks.items()} \
        == {"train": 3, "val": 1}


def test_an_output_cut_short_while_copied_into_a_bucket_is_replaced_by_the_rerun(bucket) -> None:
    """On an object store the finished output is copied into OUT with summary.json last: a
    run stopped during that copy left OUT without it, and the rerun refused OUT as "a
    non-empty folder that jobs/predict.py did not write"."""
    from fer_ray.predict import _is_scoring_output

    bucket.create_dir("bucket/preds/predictions")
    with bucket.open_output_stream("bucket/preds/predictions/part-00000.parquet") as f:
        f.write(b"x")
    with bucket.open_output_stream("bucket/preds/metrics.parquet") as f:
        f.write(b"x")
    assert not _is_scoring_output("mock://bucket/preds")  # nothing says a run was cut short
    bucket.create_dir("bucket/preds.old-1a2b3c4d")
    assert _is_scoring_output("mock://bucket/preds")
    with bucket.open_output_stream("bucket/preds/thesis.tex") as f:  # not the job's own file
        f.write(b"x")
    assert not _is_scoring_output("mock://bucket/preds")


def test_file_uris_are_one_place_with_their_local_paths(tmp_path) -> None:
    """`file:/abs` became a relative folder named "file:" under the current one; a file://
    output that is a link was replaced instead of the folder it leads to (as a plain path
    is); the parent of file:///out was "file://", not a valid URI."""
    from fer_ray import storage

    real, link = tmp_path / "real", tmp_path / "link"
    real.mkdir()
    link.symlink_to(real)
    assert storage.normalize(f"file:{real}") == f"file://{real}"
    assert storage.local_path(f"file:{real}") == str(real)
    assert storage.inside(f"file:{real}/x", str(real))
    assert storage.through_link(f"file://{link}") == str(real) == storage.through_link(str(link))
    assert storage.through_link(f"file://{real}") == f"file://{real}"  # not a link: as given
    # A folder at the root has the root for parent: "" (no parent, as a bucket has) refused
    # --output file:///preds as a bucket and found no leftovers of an interrupted /preds.
    assert storage.split_last("file:///out") == ("file:///", "out")
    assert storage.split_last("/out") == ("/", "out")
    assert storage.split_last("/") == ("", "") == storage.split_last("file:///")
    assert storage.join("file:///", "out") == "file:///out" and storage.join("/", "out") == "/out"
    assert storage.split_last(f"file://{real}/x") == (f"file://{real}", "x")


def test_a_write_that_fails_leaves_no_half_file_beside_the_file(tmp_path, monkeypatch) -> None:
    """A failed write (a full disk, a bucket's hiccup that the loop's retry then wrote past)
    left config.json.tmp in the run folder."""
    target = tmp_path / "run" / "config.json"
    storage.write_json(str(target), {"v": 1})

    class FullDisk:  # the local filesystem, whose move fails
        local = pafs.LocalFileSystem()
        create_dir, open_output_stream, delete_file = local.create_dir, local.open_output_stream, local.delete_file

        def move(self, src, dest):
            raise OSError(28, "No space left on device")

    class FullWhileWriting(FullDisk):  # its stream's write fails instead
        def move(self, src, dest):
            self.local.move(src, dest)

        def open_output_stream(self, path):
            stream = self.local.open_output_stream(path)

            class Full:
                def __enter__(self):
                    return self

                def __exit__(self, *exc):
                    stream.close()

                def write(self, data):
                    stream.write(data[:3])
                    raise OSError(28, "No space left on device")

            return Full()

    resolve = storage.resolve
    for disk in (FullDisk, FullWhileWriting):
        monkeypatch.setattr(storage, "resolve", lambda path: (disk(), resolve(path)[1]))
        with pytest.raises(OSError, match="No space left"):
            storage.write_json(str(target), {"v": 2})
        assert sorted(p.name for p in target.parent.iterdir()) == ["config.json"], disk
        assert json.loads(target.read_text()) == {"v": 1}
