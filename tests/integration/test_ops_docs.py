"""Manual pages and shell completion, as an installed system uses them: each page renders
with man(1) without a warning, dmcached.conf(5) names every key of the daemon, the pages
name every command; bash completion offers the commands, their options and the project
names of the caller's cached snapshots from a real daemon; zsh loads its completion.

And the Markdown documents: every link between them resolves (anchors included), the
README links every document of docs/, no file refers to a document outside the
repository, and the exit statuses documented in dmcache --help, dmcache(1), the README
and docs/cli.md are the same.
"""
import fnmatch
import os
import re
import shutil
import subprocess
import sys

import pytest

from conftest import BUILD, DMCACHE, DMCACHED, Daemon

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..', 'emulator'))
import client as emulator  # noqa: E402

SOURCE = os.environ.get('DMC_SOURCE_ROOT') or os.path.abspath(
    os.path.join(os.path.dirname(__file__), '..', '..'))
PAGES = ['dmcached.8', 'dmcache.1', 'dmcached.conf.5', 'dmcache-python.7']


def need(tool):
    if shutil.which(tool) is None:
        if os.environ.get('CI') == 'true':
            pytest.fail('%s is missing (scripts/install-deps.sh installs it)' % tool)
        pytest.skip('no ' + tool)


def render(page):
    need('man')
    path = os.path.join(BUILD, 'man', page)
    if not os.path.exists(path):
        need('scdoc')  # the pages are built only where scdoc is
    env = dict(os.environ, MANWIDTH='80', LC_ALL='C.UTF-8', MAN_KEEP_FORMATTING='0')
    return subprocess.run(['man', '--warnings', '-E', 'UTF-8', '-l', path], env=env,
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize('page', PAGES)
def test_man_page_renders_without_warnings(page):
    r = render(page)
    assert r.returncode == 0 and r.stderr == '', r.stderr
    text = re.sub(r'.\x08', '', r.stdout)
    name = page.rsplit('.', 1)[0]
    assert re.search(r'^NAME\n +%s - ' % re.escape(name), text, re.M), text[:300]
    assert 'SEE ALSO' in text


def commands_of_cli():
    r = subprocess.run([DMCACHE, '--help'], capture_output=True, text=True, timeout=10)
    section = r.stdout.split('Commands:')[1].split('Options:')[0]
    return sorted(set(re.findall(r'^  ([a-z]+)\b', section, re.M)))


def test_pages_name_every_command_and_key():
    text = re.sub(r'.\x08', '', render('dmcache.1').stdout)
    for cmd in commands_of_cli():
        assert re.search(r'^ {7}%s\b' % cmd, text, re.M), cmd
    conf = re.sub(r'.\x08', '', render('dmcached.conf.5').stdout)
    r = subprocess.run([DMCACHED, '--help-config'], capture_output=True, text=True, timeout=10)
    keys = re.findall(r'^  ([a-z_0-9]+) +\S+$', r.stdout, re.M)
    assert len(keys) >= 30
    for key in keys:
        assert re.search(r'^ {7}%s \(' % key, conf, re.M), key


def bash_complete(line, env):
    """The completions bash offers for `line` (the cursor at its end)."""
    script = ('source %s\nCOMP_LINE=%s\nread -ra COMP_WORDS <<< "$COMP_LINE"\n'
              '[[ $COMP_LINE == *" " ]] && COMP_WORDS+=("")\n'
              'COMP_CWORD=$((${#COMP_WORDS[@]} - 1))\nCOMP_POINT=${#COMP_LINE}\n'
              '_dmcache dmcache "${COMP_WORDS[COMP_CWORD]}" "${COMP_WORDS[COMP_CWORD-1]}"\n'
              'printf "%%s\\n" "${COMPREPLY[@]}"\n'
              % (os.path.join(SOURCE, 'completion', 'dmcache.bash'), shlex_quote(line)))
    r = subprocess.run(['bash', '--norc', '--noprofile', '-c', script], env=env,
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    return sorted(x for x in r.stdout.split('\n') if x)


def shlex_quote(s):
    return "'" + s.replace("'", "'\\''") + "'"


@pytest.fixture
def daemon_with_snapshot(tmpdir_short):
    emu = emulator.Emulator(synthetic=['syn:2:1024'])
    emu.start()
    d = Daemon(tmpdir_short)
    try:
        env = dict(d.env, DATAMINT_API_KEY=emulator.KEY_ALL, DATAMINT_API_URL=emu.url,
                   HOME=tmpdir_short)
        r = subprocess.run([DMCACHE, '--socket', d.socket, 'prefetch', 'syn'], env=env,
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stdout + r.stderr
        yield d
    finally:
        rc, _ = d.stop()
        d.notify.close()
        assert emu.stop() == 0
        assert rc == 0, d.log()


def test_bash_completion_commands_options_and_projects(daemon_with_snapshot):
    d = daemon_with_snapshot
    env = dict(os.environ, PATH=os.path.dirname(DMCACHE) + ':' + os.environ['PATH'],
               DMCACHE_SOCKET=d.socket)
    assert bash_complete('dmcache ', env) == commands_of_cli()
    assert bash_complete('dmcache p', env) == ['ping', 'prefetch']
    assert '--allow-partial' in bash_complete('dmcache prefetch --', env)
    assert bash_complete('dmcache metrics --', env) == ['--help', '--output']
    assert bash_complete('dmcache get --dtype f', env) == ['float32', 'float64']
    # project names come from the daemon: syn is cached
    assert bash_complete('dmcache prefetch ', env) == ['syn']
    assert bash_complete('dmcache evict s', env) == ['syn']
    env.pop('DMCACHE_SOCKET')
    assert bash_complete('dmcache --socket %s get ' % d.socket, env) == ['syn']


def test_zsh_completion_loads():
    need('zsh')
    compdir = os.path.join(SOURCE, 'completion')
    r = subprocess.run(['zsh', '-n', os.path.join(compdir, '_dmcache')], capture_output=True,
                       text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    r = subprocess.run(['zsh', '-f', '-c', 'fpath=(%s $fpath); autoload -Uz compinit; '
                        'compinit -u -D; print -r -- $_comps[dmcache]' % compdir],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0 and r.stdout.strip() == '_dmcache', r.stdout + r.stderr


# ---- the Markdown documents ----

def tracked(pattern=None):
    r = subprocess.run(['git', '-C', SOURCE, 'ls-files', '-z', '--cached', '--others',
                        '--exclude-standard'] + ([pattern] if pattern else []),
                       capture_output=True, text=True, timeout=60)
    if r.returncode != 0:  # not a git checkout (a release tarball): walk the tree
        out = []
        for root, dirs, files in os.walk(SOURCE):
            dirs[:] = [x for x in dirs if not x.startswith(('.', 'build'))]
            out += [os.path.relpath(os.path.join(root, f), SOURCE) for f in files]
        return [f for f in out if pattern is None or fnmatch.fnmatch(f, pattern)]
    return [f for f in r.stdout.split('\0') if f]


def prose(path):
    """The lines of a Markdown file outside fenced code blocks."""
    out, fenced = [], False
    with open(os.path.join(SOURCE, path), encoding='utf-8') as f:
        for line in f:
            if line.lstrip().startswith('```'):
                fenced = not fenced
                continue
            if not fenced:
                out.append(line.rstrip('\n'))
    return out


def slug(heading):
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to dashes."""
    text = re.sub(r'[^\w\- ]', '', heading.strip().lower())
    return text.replace(' ', '-')


def anchors(path):
    return {slug(m.group(1)) for line in prose(path)
            for m in [re.match(r'^#{1,6} +(.*)$', line)] if m}


LINK = re.compile(r'\[[^\]]*\]\(([^)\s]+)\)')


def test_every_markdown_link_resolves():
    docs = tracked('*.md')
    assert 'docs/operations.md' in docs and 'README.md' in docs
    checked = 0
    for doc in docs:
        base = os.path.dirname(doc)
        for line in prose(doc):
            for target in LINK.findall(re.sub(r'`[^`]*`', '', line)):
                if re.match(r'^[a-z]+:', target):  # https:, mailto:
                    continue
                path, _, frag = target.partition('#')
                dest = os.path.normpath(os.path.join(base, path)) if path else doc
                assert not dest.startswith('..'), (doc, target)
                assert os.path.exists(os.path.join(SOURCE, dest)), (doc, target)
                if frag and dest.endswith('.md'):
                    assert frag in anchors(dest), (doc, target, sorted(anchors(dest)))
                checked += 1
    assert checked > 30


def test_readme_links_every_document():
    text = '\n'.join(prose('README.md'))
    for doc in tracked('docs/*.md'):
        assert '](%s)' % doc in text, doc
    for doc in ('docs/architecture.md', 'docs/operations.md', 'docs/protocol.md',
                'docs/benchmarks.md', 'docs/security.md', 'docs/reliability.md'):
        assert os.path.exists(os.path.join(SOURCE, doc)), doc




def test_no_file_refers_to_documents_outside_the_repository():
    outside = re.compile(r'\.\./shared|\b(?:DESIGN|STYLE|performance|datamint-api)\.md'
                         r'|(?<![\w/\[(-])reliability\.md')
    found = []
    for f in tracked():
        if f == 'tests/integration/test_ops_docs.py':
            continue
        try:
            with open(os.path.join(SOURCE, f), encoding='utf-8') as fh:
                text = fh.read()
        except (UnicodeDecodeError, IsADirectoryError, FileNotFoundError):
            continue
        for n, line in enumerate(text.split('\n'), 1):
            if re.search(r'\.\./shared', line) or \
                    outside.search(line.replace('](reliability.md', '')):
                found.append('%s:%d: %s' % (f, n, line.strip()))
    assert not found, '\n'.join(found)


def test_documented_exit_statuses_are_the_cli_s():
    r = subprocess.run([DMCACHE, '--help'], capture_output=True, text=True, timeout=10)
    usage = r.stdout.split('Exit status:')[1]
    cli = sorted(int(x) for x in re.findall(r"(?:^|[ \n])(\d+) (?=[a-z])", usage))
    assert cli == [0, 1, 2, 3, 4, 130], usage

    man = re.sub(r'.\x08', '', render('dmcache.1').stdout)
    section = man.split('EXIT STATUS')[1].split('SEE ALSO')[0]
    assert sorted(int(x) for x in re.findall(r'^ {7}(\d+)$', section, re.M)) == cli, section

    readme = '\n'.join(prose('README.md'))
    para = readme.split('## The CLI')[1].split('Exit status:')[1].split('\n\n')[0]
    assert sorted(int(x) for x in re.findall(r'(?:^ ?|; )(\d+) ', para)) == cli, para

    guide = '\n'.join(prose('docs/cli.md'))
    table = guide.split('| status | meaning |')[1].split('\n\n')[0]
    assert sorted(int(x) for x in re.findall(r'^\| (\d+) \|', table, re.M)) == cli, table
