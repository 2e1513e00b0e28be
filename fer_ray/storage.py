"""Local paths and URIs (s3://, gs://, file://) through pyarrow filesystems.

Ray's own `storage_path` and `read_parquet` take the same strings, so a user can point
`--data` and `--output` at a bucket or a shared folder alike.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from typing import Any, Iterator, Sequence
from urllib.parse import quote, unquote

import pyarrow as pa
import pyarrow.fs as pafs

from fer_ray.config import ConfigError

log = logging.getLogger(__name__)


def is_uri(path: str) -> bool:
    return "://" in str(path) or str(path).startswith("file:/")  # (file:/abs is file:///abs)


def normalize(path: str) -> str:
    """An absolute local path, or the URI unchanged (Ray needs absolute local paths); a
    `file:/abs` URI as `file:///abs` (it was taken for a relative folder named "file:").
    ConfigError for a name that is not UTF-8 text (pyarrow cannot take it) and for a URI
    with a `#`, which URIs read as the start of a fragment and pyarrow drops with what
    follows: `s3://b/run#2` was `s3://b/run`, and every folder named from it the same one."""
    path = str(path)
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        try:  # (bytes the OS gave that are not UTF-8, shown as \ufffd)
            shown = path.encode("utf-8", "surrogateescape").decode(errors="replace")
        except UnicodeEncodeError:  # (a lone surrogate written in a config file, say)
            shown = path.encode("utf-8", "backslashreplace").decode()
        raise _not_utf8(shown) from None
    if is_uri(path) and "#" in path:
        raise ConfigError(f"{path!r}: a URI cannot hold a `#` as it is; percent-encode it as %23.")
    if path.startswith("file:/") and not path.startswith("file://"):
        path = "file://" + path[len("file:"):]
    if path.startswith("file://"):
        return path
    if is_uri(path):
        head, query = _split_query(path)  # (s3://b/x/?options: the slash before them too)
        if not head.partition("://")[2].strip("/"):
            # s3://$BUCKET/$PREFIX with both unset became "s3:", a folder here
            raise ConfigError(f"{path!r} names no bucket or folder; give one, e.g. s3://BUCKET/FOLDER.")
        return head.rstrip("/") + query
    return os.path.abspath(os.path.expanduser(path))


def resolve(path: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a local path or URI (percent-encoded, options such
    as S3's `?endpoint_override=` after the path); ConfigError for a URI that does not parse."""
    path = normalize(path)
    if is_uri(path):
        try:
            fs, inner = _from_uri(path)
        except pa.ArrowInvalid as e:
            raise ConfigError(f"{path!r} is not a valid URI ({e}); {_uri_hint(path)}") from None
        return fs, inner.rstrip("/") or "/"
    return pafs.LocalFileSystem(), path


def _uri_hint(uri: str) -> str:
    """What to change in a URI pyarrow refused."""
    scheme, _, rest = uri.partition("://")
    if scheme == "file" and not rest.startswith("/"):  # file://runs/x: "runs" read as a host
        return "a local file URI is file:///ABSOLUTE/PATH (three slashes), or give the path itself."
    if scheme != "file" and rest.startswith("/"):  # s3:///shards: s3://$BUCKET/shards, the variable unset
        return f"it names no bucket after {scheme}:// (an unset variable?); give one, e.g. {scheme}://BUCKET/FOLDER."
    return "percent-encode spaces and other special characters in it (a space is %20)."


def _from_uri(uri: str) -> tuple[pafs.FileSystem, str]:
    return pafs.FileSystem.from_uri(uri)


def _split_query(uri: str) -> tuple[str, str]:
    """("scheme://path", "?options" or "")."""
    head, sep, query = uri.partition("?")
    return head, sep + query


def inside(path: str, folder: str) -> bool:
    """Whether `path` is `folder` or under it, however each is spelt: a local path and its
    file:// URI are one place, a URI's ?options name no other place, and a symbolic link
    is the place it leads to (a link to the input inside the output: replacing the output
    would delete the input)."""
    path, folder = _place(path), _place(folder)
    if _under(path, folder):
        return True
    if is_uri(path) or is_uri(folder):
        return False
    return _under(os.path.realpath(path), os.path.realpath(folder))


def through_link(path: str) -> str:
    """The folder a local path leads to when its last name is a symbolic link to one (a
    job that replaces its output folder replaces that folder and keeps the link: replacing
    the link would leave the results beside the folder the user meant); else `path`."""
    local = local_here(path)
    if local and os.path.islink(local.rstrip("/")) and os.path.isdir(local):
        return os.path.realpath(local)  # (of a file:// URI: the local folder, the same place)
    return path


def _under(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip("/") + "/")


def same_place(a: str, b: str) -> bool:
    """Whether two spellings name one folder: a local path and its file:// URI (with or
    without a last slash), or two URIs that differ only in a last slash; a URI's options
    count (another endpoint may be another store)."""
    place = _place(a)
    return place == _place(b) and (not is_uri(place) or _split_query(normalize(a))[1] == _split_query(normalize(b))[1])


def _place(path: str) -> str:
    """The local path of a local path or file:// URI; any other URI without its options."""
    path = normalize(path)
    if path.startswith("file://"):
        try:
            return os.path.normpath(local_path(path) or path)
        except ConfigError:
            return path
    return _split_query(path)[0].rstrip("/") if is_uri(path) else path


def join(base: str, *parts: str) -> str:
    base = str(base)
    if is_uri(base):
        head, query = _split_query(base)  # the options stay at the end
        stripped = head.rstrip("/")
        if stripped.endswith(":"):  # file:/// (the root): file:///x, not file:/x
            stripped = head[:len(stripped) + 2]
        return "/".join([stripped, *[p.strip("/") for p in parts]]) + query
    return os.path.join(base, *parts)


def child(folder: str, name: str) -> str:
    """`folder`/`name` for a name as a listing gives it (decoded): percent-encoded under a
    URI, where a space, % or # would otherwise not parse or name another key."""
    return join(folder, quote(name, safe="")) if is_uri(folder) else join(folder, name)


def split_last(path: str) -> tuple[str, str]:
    """(parent, last name) of a path or URI; a URI's ?options stay on the parent. The
    parent of a bucket (s3://bucket) is "", of a folder at the root / (file:///)."""
    path = normalize(path)
    head, query = _split_query(path) if is_uri(path) else (path, "")
    if head.rstrip("/") in ("", "file:"):  # the root itself
        return "", ""
    parent, _, name = head.rstrip("/").rpartition("/")
    if parent in ("", "file://") and head.startswith(("/", "file:///")):  # the root's: /out, file:///out
        return parent + "/", name
    return (parent + query if parent and not parent.endswith((":/", "://")) else ""), name


def name_of(path: str) -> str:
    """The last name of a path or URI as a listing gives it: a URI's without its ?options
    and decoded (`my%20preds` is `my preds`)."""
    name = split_last(path)[1]
    return unquote(name) if is_uri(path) else name


def without_options(path: str) -> str:
    """A path, or a URI without its ?options (which name no part of the file: its extension
    is before them)."""
    return _split_query(path)[0] if is_uri(path) else path


def sibling(path: str, suffix: str) -> str:
    """`path` with `suffix` added to its last name: a folder beside it (a URI's ?options
    stay at the end, not inside the suffix)."""
    path = normalize(path)
    if is_uri(path):
        head, query = _split_query(path)
        return head.rstrip("/") + suffix + query
    return path.rstrip("/") + suffix


def local_path(path: str) -> str | None:
    """The local filesystem path for a plain path or file:// URI, else None."""
    fs, inner = resolve(path)
    return inner if isinstance(fs, pafs.LocalFileSystem) else None


def local_here(path: str) -> str | None:
    """local_path of a plain path or file: URI, None for any other URI without resolving
    it (a bucket's filesystem may look its credentials up)."""
    return local_path(path) if not is_uri(path) or path.startswith("file:") else None


def check_creatable(path: str, flag: str) -> None:
    """A ConfigError naming `flag` when the local folder `path` is not there and could not
    be made: the nearest part of it that exists is a file, or a folder this process may not
    write in. Checked before a job starts anything. Buckets are not checked (objects are
    written without folders)."""
    problem = _uncreatable(path)
    if problem:
        raise ConfigError(f"{flag} {path!r} cannot be created: {problem}; choose another folder.")


def _uncreatable(path: str) -> str | None:
    local = local_here(path)
    if local is None or os.path.exists(local):
        return None
    missing = os.path.abspath(local)
    while not os.path.exists(os.path.dirname(missing)):
        if os.path.dirname(missing) == missing:
            return None
        missing = os.path.dirname(missing)
    parent = os.path.dirname(missing)
    if not os.path.isdir(parent):
        return f"{parent!r} is a file"
    if os.path.islink(missing):  # (exists() is False for a link to nothing)
        return f"{missing!r} is a link to {os.readlink(missing)!r}, which does not exist"
    try:  # made and removed at once: permissions, read-only and virtual filesystems alike
        os.mkdir(missing)
        os.rmdir(missing)
    except FileExistsError:  # made by something else meanwhile
        return None
    except OSError as e:
        return f"{(e.strerror or type(e).__name__).lower()} in {parent!r}"
    return None


def missing_folders(path: str) -> list[str]:
    """`path` and each of its parents that is not there yet, deepest first: the folders a
    job that makes `path` may remove again when it fails. For a bucket, `path` alone when it
    is not there."""
    local = local_here(path)
    if local is None:
        return [] if exists(path) else [path]
    missing, folder = [], os.path.abspath(local)
    while not os.path.lexists(folder) and os.path.dirname(folder) != folder:
        missing.append(folder)
        folder = os.path.dirname(folder)
    return missing


def remove_empty(folders: list[str]) -> None:
    """Remove each of `folders` (deepest first, as missing_folders lists them) that is an
    empty folder; stop at the first that is not."""
    for folder in folders:
        if not is_dir(folder) or list_dir(folder, hidden=True):
            return
        delete_dir(folder)


def info(path: str) -> pafs.FileInfo:
    fs, inner = resolve(path)
    return fs.get_file_info(inner)


def exists(path: str) -> bool:
    return info(path).type != pafs.FileType.NotFound


def is_dir(path: str) -> bool:
    return info(path).type == pafs.FileType.Directory


def is_file(path: str) -> bool:
    return info(path).type == pafs.FileType.File


def makedirs(path: str) -> None:
    fs, inner = resolve(path)
    fs.create_dir(inner, recursive=True)


def read_bytes(path: str) -> bytes:
    fs, inner = resolve(path)
    with fs.open_input_stream(inner) as f:
        return f.read()


def read_head(path: str, size: int) -> bytes:
    """A file's first `size` bytes (fewer if it is shorter)."""
    fs, inner = resolve(path)
    with fs.open_input_stream(inner) as f:
        return f.read(size)


def write_bytes(path: str, data: bytes) -> None:
    """Write via a temporary name and a move, so readers never see half a file."""
    fs, inner = resolve(path)
    parent = inner.rsplit("/", 1)[0] if "/" in inner else ""
    if parent:
        fs.create_dir(parent, recursive=True)
    tmp = inner + ".tmp"
    try:
        with fs.open_output_stream(tmp) as f:
            f.write(data)
        fs.move(tmp, inner)
    except BaseException:  # (a full disk, a bucket's hiccup, a stop: no half file left beside it)
        with contextlib.suppress(Exception):
            fs.delete_file(tmp)
        raise


def read_json(path: str) -> Any:
    return json.loads(read_bytes(path).decode())


def read_json_or_none(path: str) -> Any:
    """The JSON in `path`, or None when it is not a file or not JSON (a file another tool
    wrote under a name fer_ray uses)."""
    if not is_file(path):
        return None
    try:
        return read_json(path)
    except (ValueError, UnicodeDecodeError):
        return None


def write_json(path: str, value: Any) -> None:
    write_bytes(path, (json.dumps(value, indent=2) + "\n").encode())


# Folders that a NAS adds inside every folder it indexes (Synology's thumbnails of each
# image, named after it): left out as hidden entries are, not read as more images of a class
# (whose thumbnails in train leaked the val images carved beside them).
NOT_CONTENT = ("@eaDir",)


def is_hidden(name: str) -> bool:
    """Whether a listing leaves an entry out: a hidden one (a leading dot) or NOT_CONTENT."""
    return name.startswith(".") or name in NOT_CONTENT


def list_dir(path: str, hidden: bool = False) -> list[pafs.FileInfo]:
    """Direct children of a folder, sorted by name, hidden entries left out unless `hidden`."""
    fs, inner = resolve(path)
    entries = _listing(fs, inner, path, recursive=False)
    return sorted((e for e in entries if hidden or not is_hidden(e.base_name)), key=lambda e: e.path)


# Where git-annex (and DataLad, built on it) and DVC keep file contents, one file per
# content: their working trees link each image there, and identical images to one file.
CONTENT_STORES = ("/.git/annex/objects/", "/.dvc/cache/")


def same_file_as(path: str, first: dict[tuple[int, int], str]) -> str | None:
    """The local path listed before `path` that is the same file, reached through symbolic
    links (a linked folder lists its files under a second name), or None: the first of it
    (noted in `first`, the files seen so far), a path that cannot be read (whoever reads it
    says why), or a separate file to the user: hard links, and links into a
    content-addressed store (a DVC or git-annex cache makes every identical image one file,
    reached by hard links or by symbolic ones; FER2013 has duplicates)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    key = (st.st_dev, st.st_ino)
    if key not in first:
        first[key] = path
        return None
    path0, real = first[key], os.path.realpath(path)
    if real != os.path.realpath(path0) or any(store in real for store in CONTENT_STORES):
        return None
    return path0


def list_files(path: str, skip: Sequence[str] = (), unlisted: list[tuple[str, str]] | None = None) -> list[str]:
    """Every file under a folder at any depth (hidden ones left out), sorted. Symlinked
    folders are followed; locally (local_files) a link to a folder above it or to one of
    the local folders `skip` is not, and a link to nothing is listed, so that whoever reads
    it says why it cannot be read. `unlisted`: see local_files."""
    fs, inner = resolve(path)
    if isinstance(fs, pafs.LocalFileSystem):
        return sorted(local_files(inner, skip, unlisted))
    entries = _listing(fs, inner, path, recursive=True)
    out = []
    for e in entries:
        rel = e.path[len(inner) :].strip("/")
        if e.type == pafs.FileType.File and not any(is_hidden(p) for p in rel.split("/")):
            out.append(e.path)
    return sorted(out)


def local_files(root: str, skip: Sequence[str] = (), unlisted: list[tuple[str, str]] | None = None) -> Iterator[str]:
    """The files under a local folder, depth first, as they are found (hidden entries left
    out). A symlinked folder is followed unless it is the folder listed or one above it
    (within the listing, or above the folder itself): pyarrow's listing followed such a loop
    until the path was 40 links deep and listed every file under it once per turn. Nor is
    a link to one of the local folders `skip` or into one (a job's output folder, linked
    from inside its input, would be read as input on the next run). A
    symlink to nothing, or to what cannot be reached (a link loop, a folder without
    permission), is listed, so that its reader says why it cannot be read; sockets and
    pipes are not (reading a pipe would wait forever). ConfigError when `root` cannot be
    listed or a name is not UTF-8; a folder inside it that cannot be listed (no permission)
    is named in a warning and left out, so that one such folder does not stop a whole job
    (and appended to `unlisted`, with the reason, for the job's outputs to say)."""
    above_root = []
    folder = os.path.realpath(root)
    while True:
        st = os.stat(folder)
        above_root.append((st.st_dev, st.st_ino))
        parent = os.path.dirname(folder)
        if parent == folder:
            break
        folder = parent
    # (Real paths: a link may lead into a skipped folder as well as to it.)
    skipped = {os.path.realpath(local): folder for folder in skip if (local := local_path(folder)) is not None}
    stack = [(root, tuple(above_root))]
    while stack:
        folder, above = stack.pop()
        try:
            with os.scandir(folder) as it:
                entries = list(it)
        except OSError as e:
            if folder == root:
                raise ConfigError(f"Cannot list the folder {folder!r}: {e.strerror or e}.") from None
            log.warning("Cannot list the folder %s (%s); its files are left out", folder, e.strerror or e)
            if unlisted is not None:
                unlisted.append((folder, str(e.strerror or e)))
            continue
        subfolders = []
        for e in entries:
            if is_hidden(e.name):
                continue
            if not _utf8(os.fsencode(e.name)):
                raise _not_utf8(os.fsencode(e.path).decode(errors="replace"))
            try:
                is_dir, is_file = e.is_dir(), e.is_file()  # both follow symlinks
            except OSError:  # a link loop, a folder without permission on the way
                is_dir = is_file = False
            if is_dir:
                st = e.stat()
                key = (st.st_dev, st.st_ino)
                if key in above:
                    log.warning("%s links back to a folder above it; not followed", e.path)
                    continue
                if skipped:  # (a link, or a folder reached through a link to a folder above the skipped one)
                    real = os.path.realpath(e.path)
                    into = next((f for r, f in skipped.items() if _under(real, r)), None)
                    if into is not None:
                        log.warning("%s leads into %s; not listed", e.path, into)
                        continue
                subfolders.append((e.path, above + (key,)))
            elif is_file or (e.is_symlink() and not os.path.exists(e.path)):  # exists: False on any error
                yield e.path
        stack.extend(subfolders)


def _listing(fs: pafs.FileSystem, inner: str, path: str, recursive: bool) -> list[pafs.FileInfo]:
    """The folder's entries; a name that is not UTF-8 (pyarrow cannot list it) is named in a
    ConfigError instead of a bare UnicodeDecodeError."""
    try:
        entries = fs.get_file_info(pafs.FileSelector(inner, recursive=recursive))
        for e in entries:
            e.path  # noqa: B018 - decoded when read: a bad name fails here, not in the caller
        return entries
    except UnicodeDecodeError:
        where = path
        if isinstance(fs, pafs.LocalFileSystem):  # find the first such name
            for root, dirs, files in os.walk(os.fsencode(inner)):
                bad = [n for n in dirs + files if not _utf8(n)]
                if bad:
                    where = os.path.join(root, bad[0]).decode(errors="replace")
                    break
                if not recursive:
                    break
        raise _not_utf8(where) from None


def _not_utf8(where: str) -> ConfigError:
    return ConfigError(
        f"{where!r} has a name that is not UTF-8 text (shown with \ufffd for the bytes "
        "that are not); rename it (e.g. `convmv -f cp1252 -t utf8`)."
    )


def _utf8(name: bytes) -> bool:
    try:
        name.decode()
        return True
    except UnicodeDecodeError:
        return False


def delete_file(path: str) -> None:
    """Delete the file at `path` (nothing when there is none)."""
    fs, inner = resolve(path)
    if fs.get_file_info(inner).type == pafs.FileType.File:
        fs.delete_file(inner)


def delete_dir(path: str) -> None:
    fs, inner = resolve(path)
    if fs.get_file_info(inner).type != pafs.FileType.NotFound:
        fs.delete_dir(inner)


def renames_folders(path: str) -> bool:
    """Whether the filesystem of `path` moves a folder by renaming it (the local disk), not
    by copying it file by file (move, which tests the filesystem it has resolved: S3, GCS)."""
    return isinstance(resolve(path)[0], pafs.LocalFileSystem)


def move(src: str, dst: str, last: str | None = None) -> None:
    """Rename a file or folder within one filesystem. Locally a rename (atomic). Object
    stores (S3, GCS) rename no folders (pyarrow refuses), so there a folder is copied file by
    file, the file named `last` (relative to the folder) after every other one, and the
    source deleted after: a reader that waits for `last` never sees half a folder."""
    fs, src_inner = resolve(src)
    _, dst_inner = resolve(dst)
    if isinstance(fs, pafs.LocalFileSystem) or fs.get_file_info(src_inner).type != pafs.FileType.Directory:
        fs.move(src_inner, dst_inner)
        return
    entries = fs.get_file_info(pafs.FileSelector(src_inner, recursive=True))
    relative = sorted(
        (e.path[len(src_inner) :].strip("/") for e in entries if e.type == pafs.FileType.File),
        key=lambda rel: (rel == last, rel),
    )
    made = set()
    for rel in relative:
        target = f"{dst_inner}/{rel}"
        parent = target.rsplit("/", 1)[0]
        if parent not in made:
            fs.create_dir(parent, recursive=True)
            made.add(parent)
        fs.copy_file(f"{src_inner}/{rel}", target)
    fs.create_dir(dst_inner, recursive=True)  # an empty folder moves too
    fs.delete_dir(src_inner)


def copy_dir(src: str, dst: str) -> None:
    """Copy a folder tree between any two filesystems (local <-> bucket)."""
    src_fs, src_inner = resolve(src)
    dst_fs, dst_inner = resolve(dst)
    dst_fs.create_dir(dst_inner, recursive=True)
    pafs.copy_files(src_inner, dst_inner, source_filesystem=src_fs, destination_filesystem=dst_fs)


def full_path(fs: pafs.FileSystem, inner: str, listed_from: str = "") -> str:
    """Turn a filesystem-internal path back into the string a user would pass: a URI's path
    percent-encoded (a key with spaces, % or # resolves back to itself), with the options of
    the URI it was listed from (`listed_from`), such as S3's endpoint_override."""
    if isinstance(fs, pafs.LocalFileSystem):
        return inner
    head, query = _split_query(str(listed_from))
    if inner.startswith("/") and "://" in head:
        # HDFS-style: the path inside is absolute and the host:port stays in the URI's authority
        # (object stores' inner paths begin with the bucket instead).
        scheme, rest = head.split("://", 1)
        return f"{scheme}://{rest.split('/', 1)[0]}{quote(inner, safe='/')}{query}"
    # The scheme it was listed from: gs:// came back as pyarrow's "gcs://", so a gs:// source's
    # paths in manifests and predictions matched none of the user's own lists.
    scheme = head.split("://", 1)[0] if "://" in head else fs.type_name
    return f"{scheme}://{quote(inner, safe='/')}{query}"
