"""The container of nanoseg model files: a zip of one JSON document and ``.npy`` arrays.

This module knows the file, not the estimators in it. It writes and reads
an archive in the layout of :func:`numpy.savez`:

* the entry :data:`DOCUMENT_ENTRY` holds a JSON document that names the
  format (:data:`FORMAT_NAME`) and its version (:data:`FORMAT_VERSION`);
* every other entry is one boolean or numeric array in ``.npy`` format,
  written and read with ``allow_pickle=False``. The document refers to each
  by its entry name, with the dtype and shape it must have.

Writing is deterministic (fixed timestamps, a fixed entry order), so saving
the same model twice gives the same bytes, and atomic: the archive is
written under a temporary name and moved into place once complete.

Reading never unpickles and never allocates an array before its ``.npy``
header has been checked against the document: object, string and structured
dtypes are refused, a shape larger than the stored data is refused, each
entry may be used once, and an entry that nothing uses is an error
(:meth:`ArrayEntries.check_all_used`). Files that are not model files (a
pickle, a single ``.npy``, any other zip) are told apart from damaged ones
in the errors.
"""

from __future__ import annotations

import json
import math
import os
import uuid
import zipfile
import zlib

import numpy as np
import sklearn

__all__ = [
    "ARRAY_KINDS",
    "DOCUMENT_ENTRY",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "ArrayEntries",
    "document_text",
    "exists_error",
    "not_a_model",
    "open_archive",
    "read_document",
    "write_file",
    "write_member",
]

#: Name written in every model file, so that other JSON-in-zip files are told apart.
FORMAT_NAME = "nanoseg-model"

#: Version of the file layout that :func:`nanoseg.persistence.save` writes and
#: the newest :func:`nanoseg.persistence.load` reads.
FORMAT_VERSION = 1

#: Archive entry that holds the JSON document.
DOCUMENT_ENTRY = "nanoseg_model.json"

#: dtype kinds an array may have: booleans and numbers. Object, string, void
#: (structured) and datetime arrays are refused.
ARRAY_KINDS = "biufc"

# Zip entries get a fixed timestamp so that saving the same model twice
# writes the same bytes.
_ZIP_DATE = (1980, 1, 1, 0, 0, 0)

# Exceptions that reading a damaged zip or .npy entry can raise.
_READ_ERRORS = (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error)


# -- writing -----------------------------------------------------------------


def document_text(estimator_node, nanoseg_version):
    """The JSON document of a model file.

    Parameters
    ----------
    estimator_node : dict
        The encoded estimator tree (JSON values only).
    nanoseg_version : str
        Version of nanoseg writing the file.

    Returns
    -------
    text : str
    """
    return json.dumps(
        {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "nanoseg_version": nanoseg_version,
            "sklearn_version": sklearn.__version__,
            "estimator": estimator_node,
        },
        indent=1,
        allow_nan=False,
    )


def _zip_info(name):
    info = zipfile.ZipInfo(name, date_time=_ZIP_DATE)
    info.compress_type = zipfile.ZIP_DEFLATED
    return info


def write_member(archive, key, array):
    """Write one array as the ``.npy`` entry `key` of an open zip archive."""
    with archive.open(_zip_info(key + ".npy"), "w", force_zip64=array.nbytes > 2**30) as member:
        np.lib.format.write_array(member, array, allow_pickle=False)


def _write_archive(fileobj, document, arrays, write_member):
    with zipfile.ZipFile(fileobj, "w") as archive:
        archive.writestr(_zip_info(DOCUMENT_ENTRY), document.encode("utf-8"))
        for key, array in arrays.items():
            write_member(archive, key, array)


def write_file(path, document, arrays, *, overwrite, write_member=write_member):
    """Write a model file to `path` in one step.

    Parameters
    ----------
    path : pathlib.Path
        Destination; its folder must exist.
    document : str
        The JSON document (see :func:`document_text`).
    arrays : dict of str to ndarray
        The array entries, by the names the document uses, in the order
        they are written.
    overwrite : bool
        Replace `path` if it exists.
    write_member : callable, default=write_member
        ``write_member(archive, key, array)`` writes one array entry.

    Raises
    ------
    FileExistsError
        If `path` exists and `overwrite` is False.

    Notes
    -----
    The archive is written under a temporary name in the same folder and
    moved to `path` only once complete, so an interrupted write never
    leaves a partial file at `path` (nor damages the file it was to
    replace).
    """
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    # os.open with O_EXCL and mode 0o666 gives the file the permissions a new
    # file normally gets (the umask applies), unlike tempfile's 0o600.
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as stream:
            _write_archive(stream, document, arrays, write_member)
            stream.flush()
            os.fsync(stream.fileno())
        _publish(temporary, path, overwrite)
    finally:
        if os.path.lexists(temporary):
            os.unlink(temporary)


def _publish(temporary, path, overwrite):
    """Move the finished temporary file to `path` in one step."""
    if overwrite:
        os.replace(temporary, path)
        return
    try:
        # A hard link fails if `path` exists, even when another process
        # creates it meanwhile; the temporary name is removed afterwards.
        os.link(temporary, path)
    except FileExistsError:
        raise exists_error(path) from None
    except OSError:
        # File systems without hard links.
        if os.path.lexists(path):
            raise exists_error(path) from None
        os.replace(temporary, path)
    else:
        os.unlink(temporary)


def exists_error(path):
    """The error for a save that would replace `path` without ``overwrite=True``."""
    return FileExistsError(f"{path} exists; pass overwrite=True to replace it, or choose another path.")


# -- reading -----------------------------------------------------------------


def not_a_model(source, reason):
    """The error for a file that is not a nanoseg model file at all."""
    return ValueError(
        f"{source} is not a nanoseg model file ({reason}). nanoseg.persistence.load reads only "
        "files written by nanoseg.persistence.save. A joblib or pickle file can run arbitrary "
        "code when loaded: open it with joblib.load only if you trust where it comes from."
    )


def _describe_content(start):
    """What a file that is not a zip archive looks like, from its first bytes."""
    if not start:
        return "it is empty"
    if start.startswith(np.lib.format.MAGIC_PREFIX):
        return "it is a single NumPy array (.npy), not an archive"
    if start.startswith(b"\x80"):
        return "it looks like a pickle or joblib file"
    return "it is not a zip (.npz) archive"


def open_archive(stream, source):
    """Open a model file as a :class:`numpy.lib.npyio.NpzFile`, refusing pickles.

    Parameters
    ----------
    stream : binary file object
        The file, positioned at its start; it must be seekable.
    source : str
        How to name the file in errors.

    Returns
    -------
    archive : numpy.lib.npyio.NpzFile
        Opened with ``allow_pickle=False``; close it after use.
    """
    start = stream.read(len(np.lib.format.MAGIC_PREFIX))
    stream.seek(-len(start), os.SEEK_CUR)
    if not start.startswith(b"PK\x03\x04"):
        raise not_a_model(source, _describe_content(start))
    try:
        return np.load(stream, allow_pickle=False)
    except _READ_ERRORS as err:
        reason = f"it cannot be read as a zip (.npz) archive, or it is damaged: {err}"
        raise not_a_model(source, reason) from err


def read_document(archive, source):
    """The decoded JSON document of an open archive, once it declares the format.

    Parameters
    ----------
    archive : numpy.lib.npyio.NpzFile
        The open archive.
    source : str
        How to name the file in errors.

    Returns
    -------
    document : dict
        Its ``"format"`` is :data:`FORMAT_NAME`; nothing else is checked.
    """
    if DOCUMENT_ENTRY not in archive.files:
        raise not_a_model(source, f"it is a zip/npz archive without the entry {DOCUMENT_ENTRY!r}")
    try:
        raw = archive[DOCUMENT_ENTRY]
        if not isinstance(raw, bytes):
            raise ValueError("the document entry is not text")
        document = json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)
    except (RecursionError, *_READ_ERRORS) as err:
        raise not_a_model(source, f"its document entry cannot be read as JSON: {err}") from err
    if not isinstance(document, dict) or document.get("format") != FORMAT_NAME:
        raise not_a_model(source, f"its document does not declare the format {FORMAT_NAME!r}")
    return document


def _reject_constant(name):
    raise ValueError(f"{name} is not valid JSON")


class ArrayEntries:
    """The array entries of an open archive, each read at most once and checked first.

    Parameters
    ----------
    archive : numpy.lib.npyio.NpzFile
        The open archive.
    source : str
        How to name the file in errors.
    """

    def __init__(self, archive, source):
        self.archive = archive
        self.source = source
        self.used = set()

    def damaged(self, where, problem):
        """The error for a file whose content does not hold together.

        Parameters
        ----------
        where : str
            Where in the estimator tree the problem is (``estimator.steps[0]``).
        problem : str
            What is wrong there.

        Returns
        -------
        error : ValueError
        """
        return ValueError(
            f"The model file {self.source} is damaged or was edited: at {where}, {problem}. "
            "Save the model again from the original estimator."
        )

    def read(self, node, where):
        """The array (or NumPy scalar) that a document node refers to.

        Parameters
        ----------
        node : dict
            ``{"ndarray" or "scalar": entry, "dtype": str, "shape": list}``.
        where : str
            Its place in the estimator tree, for errors.

        Returns
        -------
        value : ndarray or numpy.generic
        """
        tag = "scalar" if "scalar" in node else "ndarray"
        key = node[tag]
        if set(node) != {tag, "dtype", "shape"} or not isinstance(key, str):
            raise self.damaged(where, "an array entry needs exactly its entry name, 'dtype' and 'shape'")
        if key not in self.archive.files or key == DOCUMENT_ENTRY or key in self.used:
            raise self.damaged(where, f"the array entry {key!r} is missing or used twice")
        self.used.add(key)
        # The .npy header first: dtype and shape are checked before any array
        # memory is allocated or any data read.
        try:
            shape, dtype, size = self._header(key)
        except _READ_ERRORS as err:
            raise self.damaged(where, f"the array entry {key!r} cannot be read ({err})") from err
        if dtype.hasobject:
            raise ValueError(
                f"Refusing to load {self.source}: its entry {key!r} holds pickled Python "
                "objects, which could run code when loaded. nanoseg model files never "
                "contain them; this file was not written by nanoseg.persistence.save, or "
                "was altered. Do not load it with pickle or joblib unless you trust its source."
            )
        if dtype.kind not in ARRAY_KINDS:
            raise self.damaged(
                where, f"the array {key!r} has dtype {dtype}; only booleans and numbers are allowed"
            )
        if dtype.str != node["dtype"] or list(shape) != node["shape"]:
            raise self.damaged(
                where,
                f"the array {key!r} has dtype {dtype} and shape {shape}, but the document "
                f"records {node['dtype']!r} and {node['shape']!r}",
            )
        if math.prod(shape) * dtype.itemsize > size:
            raise self.damaged(where, f"the array entry {key!r} is shorter than its shape requires")
        try:
            array = self.archive[key]
        except (MemoryError, *_READ_ERRORS) as err:
            raise self.damaged(where, f"the array entry {key!r} cannot be read ({err})") from err
        if tag == "scalar":
            if array.shape != ():
                raise self.damaged(where, f"the scalar {key!r} is an array of shape {array.shape}")
            return array[()]
        return array

    def _header(self, key):
        """Shape, dtype and stored size of an ``.npy`` entry, from its header alone."""
        info = self.archive.zip.getinfo(key + ".npy")
        with self.archive.zip.open(info) as member:
            version = np.lib.format.read_magic(member)
            if version == (1, 0):
                shape, _, dtype = np.lib.format.read_array_header_1_0(member)
            elif version == (2, 0):
                shape, _, dtype = np.lib.format.read_array_header_2_0(member)
            else:
                raise ValueError(f"unsupported .npy format version {version}")
        return shape, dtype, info.file_size

    def check_all_used(self, where):
        """Refuse an archive with entries that no part of the document used."""
        extra = sorted(set(self.archive.files) - self.used - {DOCUMENT_ENTRY})
        if extra:
            raise self.damaged(where, f"the archive holds entries no estimator uses: {extra}")
