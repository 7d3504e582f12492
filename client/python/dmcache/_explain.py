"""What a failed Loader construction tried, added to its error: the local folder looked
for (when the name was not given with a server), where the refused API key came from, the
project and server a failed connection was for. The error keeps its class and fields."""
import os

from . import _lib, errors


def local_folder(root, project):
    """The dataset folder a name stands for: <root>/<name>, else ./<name>."""
    base = os.fspath(root) if root is not None else os.getcwd()
    return os.path.abspath(os.path.join(base, os.path.expanduser(os.fspath(project))))


def _key_origin(api_key, server_url):
    if api_key:
        return 'api_key='
    try:
        origin = _lib.load_credentials(None, server_url)[2]
    except errors.DmcacheError:
        origin = None
    return {'DATAMINT_API_KEY': 'DATAMINT_API_KEY',
            'file': 'the datamintapi.yaml file'}.get(origin, 'the credentials')


def open_failure(exc, project, root, api_key, server_url, server):
    """`exc` (a DmcacheError of OPEN, connecting or finding the key) with what was tried
    added to its message."""
    notes = []
    if isinstance(exc, errors.ConnectError):
        notes.append("to open project '%s' on %s" % (project, server or 'the default server'))
    if isinstance(exc, errors.KeyRefusedError):
        notes.append('%s refused the API key from %s: check that key' %
                     (server or 'the server', _key_origin(api_key, server_url)))
    if server_url is None and (isinstance(exc, errors.NotFoundError) or not exc.code):
        # a bare name: a local folder of that name was looked for first
        notes.append('no local dataset folder either (looked for %s)' %
                     os.path.join(local_folder(root, project), 'dataset.json'))
    if notes:
        exc.message = '%s; %s' % (exc.message, '; '.join(notes))
        exc.args = (exc.message,)
    return exc
