"""The DICOM header of an item as `dicom_metainfo`.

The daemon sends the header as the DICOM JSON model (PS3.18 F; pixel data excluded) under
the item metadata's "dicom" -> "header". With pydicom installed it becomes a
pydicom.Dataset (Dataset.from_json), so attribute access, tags and helpers work as on the
Datamint client's pydicom object. Without pydicom, DicomMeta gives the same attribute
access for the keywords in KEYWORDS (the patient, study, series, equipment, image-plane,
image-pixel, CT/MR-acquisition and VOI-LUT attributes a training script reads), and every
element by tag: meta[0x00100040], meta[0x0010, 0x0040] or meta['00100040'].
"""
import json
import os
import threading

from . import errors

try:
    import pydicom
except ImportError:  # the fallback below serves
    pydicom = None

# keyword -> tag, from the DICOM data dictionary (PS3.6); a test checks it against pydicom's
KEYWORDS = {
    'SpecificCharacterSet': 0x00080005,
    'ImageType': 0x00080008,
    'InstanceCreationDate': 0x00080012,
    'InstanceCreationTime': 0x00080013,
    'SOPClassUID': 0x00080016,
    'SOPInstanceUID': 0x00080018,
    'StudyDate': 0x00080020,
    'SeriesDate': 0x00080021,
    'AcquisitionDate': 0x00080022,
    'ContentDate': 0x00080023,
    'StudyTime': 0x00080030,
    'SeriesTime': 0x00080031,
    'AcquisitionTime': 0x00080032,
    'ContentTime': 0x00080033,
    'AccessionNumber': 0x00080050,
    'Modality': 0x00080060,
    'Manufacturer': 0x00080070,
    'InstitutionName': 0x00080080,
    'ReferringPhysicianName': 0x00080090,
    'StationName': 0x00081010,
    'StudyDescription': 0x00081030,
    'SeriesDescription': 0x0008103E,
    'InstitutionalDepartmentName': 0x00081040,
    'ManufacturerModelName': 0x00081090,
    'BodyPartExamined': 0x00180015,
    'PatientName': 0x00100010,
    'PatientID': 0x00100020,
    'PatientBirthDate': 0x00100030,
    'PatientSex': 0x00100040,
    'PatientAge': 0x00101010,
    'PatientSize': 0x00101020,
    'PatientWeight': 0x00101030,
    'EthnicGroup': 0x00102160,
    'ContrastBolusAgent': 0x00180010,
    'ScanningSequence': 0x00180020,
    'SequenceVariant': 0x00180021,
    'ScanOptions': 0x00180022,
    'MRAcquisitionType': 0x00180023,
    'SliceThickness': 0x00180050,
    'KVP': 0x00180060,
    'RepetitionTime': 0x00180080,
    'EchoTime': 0x00180081,
    'InversionTime': 0x00180082,
    'MagneticFieldStrength': 0x00180087,
    'SpacingBetweenSlices': 0x00180088,
    'DeviceSerialNumber': 0x00181000,
    'SoftwareVersions': 0x00181020,
    'ProtocolName': 0x00181030,
    'ReconstructionDiameter': 0x00181100,
    'DistanceSourceToDetector': 0x00181110,
    'DistanceSourceToPatient': 0x00181111,
    'GantryDetectorTilt': 0x00181120,
    'TableHeight': 0x00181130,
    'RotationDirection': 0x00181140,
    'ExposureTime': 0x00181150,
    'XRayTubeCurrent': 0x00181151,
    'Exposure': 0x00181152,
    'FilterType': 0x00181160,
    'ConvolutionKernel': 0x00181210,
    'PatientPosition': 0x00185100,
    'ViewPosition': 0x00185101,
    'FlipAngle': 0x00181314,
    'StudyInstanceUID': 0x0020000D,
    'SeriesInstanceUID': 0x0020000E,
    'StudyID': 0x00200010,
    'SeriesNumber': 0x00200011,
    'AcquisitionNumber': 0x00200012,
    'InstanceNumber': 0x00200013,
    'ImagePositionPatient': 0x00200032,
    'ImageOrientationPatient': 0x00200037,
    'FrameOfReferenceUID': 0x00200052,
    'Laterality': 0x00200060,
    'ImageLaterality': 0x00200062,
    'PositionReferenceIndicator': 0x00201040,
    'SliceLocation': 0x00201041,
    'ImageComments': 0x00204000,
    'SamplesPerPixel': 0x00280002,
    'PhotometricInterpretation': 0x00280004,
    'PlanarConfiguration': 0x00280006,
    'NumberOfFrames': 0x00280008,
    'Rows': 0x00280010,
    'Columns': 0x00280011,
    'PixelSpacing': 0x00280030,
    'ImagerPixelSpacing': 0x00181164,
    'BitsAllocated': 0x00280100,
    'BitsStored': 0x00280101,
    'HighBit': 0x00280102,
    'PixelRepresentation': 0x00280103,
    'SmallestImagePixelValue': 0x00280106,
    'LargestImagePixelValue': 0x00280107,
    'WindowCenter': 0x00281050,
    'WindowWidth': 0x00281051,
    'RescaleIntercept': 0x00281052,
    'RescaleSlope': 0x00281053,
    'RescaleType': 0x00281054,
    'WindowCenterWidthExplanation': 0x00281055,
    'LossyImageCompression': 0x00282110,
    'LossyImageCompressionRatio': 0x00282112,
    'PixelPaddingValue': 0x00280120,
    'RedPaletteColorLookupTableDescriptor': 0x00281101,
    'GreenPaletteColorLookupTableDescriptor': 0x00281102,
    'BluePaletteColorLookupTableDescriptor': 0x00281103,
    'VOILUTFunction': 0x00281056,
    'PresentationLUTShape': 0x20500020,
    'BurnedInAnnotation': 0x00280301,
    'TransferSyntaxUID': 0x00020010,
    'MediaStorageSOPClassUID': 0x00020002,
    'MediaStorageSOPInstanceUID': 0x00020003,
}


def _value(elem):
    """A JSON-model element's value as pydicom would give it: scalar or list, PN as text."""
    vr = elem.get('vr')
    if 'Value' not in elem:
        if 'InlineBinary' in elem:
            import base64
            return base64.b64decode(elem['InlineBinary'])
        return None
    vals = elem['Value']
    if vr == 'SQ':
        return [DicomMeta(v) for v in vals]
    if vr == 'PN':
        vals = ['' if v is None else (v.get('Alphabetic', '') if isinstance(v, dict) else v)
                for v in vals]
    if len(vals) == 1:
        return vals[0]
    return list(vals)


def _tag_key(tag):
    if isinstance(tag, tuple):
        if len(tag) != 2:
            raise KeyError(tag)
        tag = (int(tag[0]) << 16) | int(tag[1])
    if isinstance(tag, int):
        return '%08X' % tag
    if isinstance(tag, str):
        t = tag.replace('(', '').replace(')', '').replace(',', '').replace(' ', '').upper()
        if len(t) == 8 and all(ch in '0123456789ABCDEF' for ch in t):
            return t
        if tag in KEYWORDS:
            return '%08X' % KEYWORDS[tag]
    raise KeyError(tag)


class DicomMeta:
    """A DICOM header (JSON model) with pydicom-like access, used when pydicom is absent."""

    def __init__(self, header):
        object.__setattr__(self, '_h', dict(header or {}))

    def __getattr__(self, name):
        if name.startswith('_'):
            raise AttributeError(name)
        tag = KEYWORDS.get(name)
        if tag is None:
            raise AttributeError("'DicomMeta' has no attribute '%s' (without pydicom, keywords "
                                 "outside dmcache._dicom.KEYWORDS are read by tag)" % name)
        elem = self._h.get('%08X' % tag)
        if elem is None:
            raise AttributeError("'DicomMeta' has no attribute '%s'" % name)
        return _value(elem)

    def __setattr__(self, name, value):
        raise AttributeError('DicomMeta is read-only')

    def __getitem__(self, tag):
        elem = self._h.get(_tag_key(tag))
        if elem is None:
            raise KeyError(tag)
        return _value(elem)

    def __contains__(self, tag):
        try:
            return _tag_key(tag) in self._h
        except KeyError:
            return False

    def get(self, key, default=None):
        try:
            return self[key]
        except KeyError:
            return default

    def __len__(self):
        return len(self._h)

    def __iter__(self):
        return iter(sorted(self._h))

    def keys(self):
        return sorted(self._h)

    def to_json_dict(self):
        return dict(self._h)

    def to_json(self):
        return json.dumps(self._h)

    def __dir__(self):
        return sorted(set(super().__dir__()) |
                      {k for k, t in KEYWORDS.items() if '%08X' % t in self._h})

    def __repr__(self):
        return '<DicomMeta: %d elements>' % len(self._h)

    def __reduce__(self):
        return (DicomMeta, (self._h,))


def _no_bulk_data(uri):
    return b''


def _has_bulk_data(header):
    """Whether a DICOM JSON header (or a sequence item) has a BulkDataURI anywhere."""
    for elem in header.values():
        if not isinstance(elem, dict):
            continue
        if 'BulkDataURI' in elem:
            return True
        if elem.get('vr') == 'SQ':
            for item in elem.get('Value') or ():
                if isinstance(item, dict) and _has_bulk_data(item):
                    return True
    return False


def from_item_meta(dicom, use_pydicom=True):
    """dicom_metainfo for the item metadata's "dicom" object: None for a non-DICOM item."""
    if not dicom or dicom.get('format') != 'dicom':
        return None
    header = dicom.get('header') or {}
    if use_pydicom and pydicom is not None:
        # pydicom inspects a handler's signature once per element (about half of from_json's
        # time for a CT header); the daemon sends no BulkDataURI, so one is passed only when
        # the header has one (its value b'', as always)
        handler = _no_bulk_data if _has_bulk_data(header) else None
        return pydicom.Dataset.from_json(header, bulk_data_uri_handler=handler)
    return DicomMeta(header)


# ---- the DICOM file's own bytes: a pydicom FileDataset as the Datamint client returns -----
# The Datamint client gives dicom_metainfo as pydicom.dcmread(file): a FileDataset with
# file_meta (transfer syntax, ...) and every value exactly as pydicom reads it from the file
# ('80.0000' stays '80.0000', -0.0 keeps its sign). The JSON model the daemon sends cannot
# give that (DS and IS become JSON numbers), so the FileDataset is read from the file's own
# bytes: the file itself for a local folder, else the file the daemon stored when it
# downloaded it (Dataset.read_file: an OPEN with DMC_OPEN_RAW, the caller's own access).


def as_the_client(ds):
    """What both generations of the client do to the FileDataset they return once the image
    is decoded (dataset.py@af98a24 _load_image, io_utils.py@1.2.4 read_array_normalized):
    the pixel data is let go, the element staying with the value None."""
    if hasattr(ds, '_pixel_array'):
        ds._pixel_array = None
    if hasattr(ds, 'PixelData'):
        ds.PixelData = None
    return ds


def from_path(path):
    """pydicom.dcmread(path) as the client returns it (as_the_client); the pixel data is
    never read (defer_size)."""
    return as_the_client(pydicom.dcmread(path, defer_size='256 KB'))


def from_bytes(data):
    """pydicom.dcmread of a DICOM file's bytes, as the client returns it (as_the_client)."""
    import io
    return as_the_client(pydicom.dcmread(io.BytesIO(data), defer_size='256 KB'))


# ---- the same FileDataset, read on first use -------------------------------------------
# Reading a CT header costs pydicom about as much as the rest of an item, and a DataLoader
# worker pickles what it returns to the main process, where a read FileDataset is costly
# to pickle and unpickle. A training loop often never looks at it. LazyFileDataset is a
# FileDataset that has read nothing yet: the first use of anything a Dataset offers
# (an attribute or keyword, [tag], `in`, iteration, len, ==, str/repr, dir(), copy, to_json,
# file_meta, pixel_array, setting or deleting) reads it, exactly as from_path/from_bytes
# would, and from then on it IS that FileDataset (its class becomes the one dcmread gave).
# Until then it pickles as its source only: the file's path (with its size and mtime) or
# the stored file's bytes. A file that cannot be read as DICOM raises pydicom's error at
# that first use (not in dataset[i]); a local file changed since dataset[i] raises
# DmcacheError there instead of giving another file's header.

_NO_READ = frozenset(('__class__', '__reduce_ex__', '__reduce__', '_dmc_source'))
# attributes a FileDataset never has that torch asks every item element for (pin_memory=True
# asks hasattr(x, 'pin_memory') in the main process): answered without reading the file
_NEVER = frozenset(('pin_memory',))
_read_lock = threading.Lock()


def _new_lock_in_child():
    global _read_lock
    _read_lock = threading.Lock()


if hasattr(os, 'register_at_fork'):  # a lock held by another thread at fork() stays held
    os.register_at_fork(after_in_child=_new_lock_in_child)


def _read_now(obj):
    """Reads obj's source into obj (once; the other threads wait), then obj is the read
    FileDataset. Raises what reading raises, obj staying unread."""
    with _read_lock:
        if type(obj) is not LazyFileDataset:
            return
        src = object.__getattribute__(obj, '_dmc_source')
        ds = _read_source(src)
        d = object.__getattribute__(obj, '__dict__')
        object.__setattr__(obj, '__class__', type(ds))
        d.clear()
        d.update(ds.__dict__)


def _read_source(src):
    if src[0] == 'bytes':
        return from_bytes(src[1])
    path, size, mtime_ns = src[1:]
    try:
        st = os.stat(path)
    except OSError as e:
        raise errors.DmcacheError("the DICOM file %s is gone since its item was read: %s"
                                  % (path, e.strerror)) from None
    if (st.st_size, st.st_mtime_ns) != (size, mtime_ns):
        raise errors.DmcacheError(
            "the DICOM file %s changed since its item was read (dicom_metainfo is read "
            "from the file on first use)" % path)
    return from_path(path)


class LazyFileDataset(pydicom.dataset.FileDataset if pydicom is not None else object):
    """A pydicom FileDataset read on first use (see above). Build it with lazy_from_path
    or lazy_from_bytes."""

    def __init__(self, source):  # FileDataset.__init__ runs when it is read
        object.__setattr__(self, '_dmc_source', source)

    def __getattribute__(self, name):
        if name in _NO_READ:
            return object.__getattribute__(self, name)
        if name in _NEVER:
            raise AttributeError("'FileDataset' object has no attribute '%s'" % name)
        _read_now(self)
        return getattr(self, name)

    def __getattr__(self, name):  # after __getattribute__ raised AttributeError
        if type(self) is LazyFileDataset:  # unread: a name of _NEVER
            raise AttributeError("'FileDataset' object has no attribute '%s'" % name)
        return pydicom.dataset.Dataset.__getattr__(self, name)

    def __reduce_ex__(self, protocol):
        return (LazyFileDataset, (object.__getattribute__(self, '_dmc_source'),))

    __hash__ = None  # as pydicom.Dataset


def _read_first(name):
    def method(self, *args, **kwargs):
        _read_now(self)
        return getattr(type(self), name)(self, *args, **kwargs)
    method.__name__ = name
    return method


# the special methods Python looks up on the class (not through __getattribute__)
for _name in ('__contains__', '__delattr__', '__delitem__', '__dir__', '__eq__', '__ne__',
              '__getitem__', '__iter__', '__len__', '__setattr__', '__setitem__', '__str__',
              '__repr__', '__format__', '__copy__', '__deepcopy__', '__enter__', '__exit__',
              '__array__', '__getstate__'):
    setattr(LazyFileDataset, _name, _read_first(_name))
del _name


def lazy_from_path(path):
    """from_path(path), read on first use (LazyFileDataset)."""
    st = os.stat(path)
    return LazyFileDataset(('path', path, st.st_size, st.st_mtime_ns))


def lazy_from_bytes(data):
    """from_bytes(data), read on first use (LazyFileDataset)."""
    return LazyFileDataset(('bytes', bytes(data)))


HTTP_MAX = 1 << 30  # the largest body MaskSource reads


class MaskSource:
    """Segmentation mask files of a Datamint project read from the server with the caller's
    key (GET /annotations/{resource}/annotations/{id}/file), for the 2025 client's
    segmentation outputs."""

    def __init__(self, server, api_key, timeout=60):
        self.server, self.key, self.timeout = (server or '').rstrip('/'), api_key, timeout

    def fetch(self, path):
        """GET <server><path> with the key: the body (at most HTTP_MAX bytes)."""
        import urllib.request
        req = urllib.request.Request(self.server + path, headers={
            'apikey': self.key, 'accept': 'application/octet-stream'})
        with urllib.request.urlopen(req, timeout=self.timeout) as resp:
            data = resp.read(HTTP_MAX + 1)
        if len(data) > HTTP_MAX:
            raise ValueError('%s is over %d bytes' % (path, HTTP_MAX))
        return data
