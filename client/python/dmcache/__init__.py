"""dmcache: Datamint datasets decoded and served by the local dmcached daemon.

    import dmcache
    dataset = dmcache.Dataset(root='data', dataset_name='TestCTdataset', version='latest',
                              api_key='my_api_key', transform=ToTensor())
    image, dicom_metainfo, metainfo = dataset[0]

    loader = dmcache.Loader('TestCTdataset', batch_size=32, shuffle=True, seed=0)
    for epoch in range(10):
        loader.set_epoch(epoch)
        for images, meta, indices in loader:
            ...

Dataset is a drop-in for the Datamint client's Dataset (datamintapi.Dataset); Loader
reads whole batches from the daemon's shared memory without copies. Both speak to the
daemon through libdmcache (ctypes): the socket is $DMCACHE_SOCKET, else the default
paths, or socket= when given. Failures raise dmcache.DmcacheError subclasses carrying the
daemon's code, message and resource id. See the README, "Python package".
"""
from ._lib import LIBRARY_PATH, Client, load_credentials
from ._lib import version as library_version
from ._dicom import DicomMeta
from .dataset import Dataset, normalize
from .errors import (CacheFullError, CancelledError, ConnectError, DaemonConnectionError,
                     DaemonIOError, DecodeError, DmcacheError, IntegrityError, InternalError,
                     InvalidArgumentError, KeyRefusedError, LimitExceededError,
                     NotFoundError,
                     OverloadedError, ProtocolError, UnsupportedError,
                     UpstreamPermanentError, UpstreamRefusedError,
                     UpstreamTransientError)
from .loader import (Batch, BatchMismatchError, Loader, collate, distributed_env,
                     rank_indices)

__version__ = library_version()

__all__ = [
    'Batch', 'BatchMismatchError', 'CacheFullError', 'CancelledError', 'Client', 'ConnectError',
    'DaemonConnectionError', 'DaemonIOError', 'Dataset', 'DecodeError', 'DicomMeta',
    'DmcacheError', 'IntegrityError', 'InternalError', 'InvalidArgumentError', 'KeyRefusedError',
    'LIBRARY_PATH',
    'LimitExceededError', 'Loader', 'NotFoundError', 'OverloadedError', 'ProtocolError',
    'UnsupportedError', 'UpstreamPermanentError', 'UpstreamRefusedError',
    'UpstreamTransientError', 'collate',
    'distributed_env', 'load_credentials', 'normalize', 'rank_indices',
]
