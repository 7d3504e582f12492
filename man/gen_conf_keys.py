"""Writes dmcached.conf(5) in scdoc: the template with @KEYS@ replaced by the keys that
`dmcached --help-config` lists (type, default, unit, reload or restart), so the page
cannot drift from the daemon's key table.

    gen_conf_keys.py DMCACHED TEMPLATE OUTPUT
"""
import re
import subprocess
import sys


def escape(text):
    return re.sub(r'([\\*_])', r'\\\1', text)


def main():
    dmcached, template, output = sys.argv[1:4]
    out = subprocess.run([dmcached, '--help-config'], capture_output=True, text=True,
                         check=True).stdout
    keys, cur = [], None
    for line in out.splitlines():
        m = re.match(r'^  ([a-z_0-9]+) +(\S+)$', line)
        if m:
            cur = [m.group(1), m.group(2), '']
            keys.append(cur)
        elif cur and line.startswith('      '):
            cur[2] += (' ' if cur[2] else '') + line.strip()
    if not keys:
        sys.exit('gen_conf_keys: no keys in dmcached --help-config')
    text = '\n\n'.join('*%s* (%s)\n\t%s' % (escape(k), escape(t), escape(h))
                       for k, t, h in keys)
    with open(template) as f:
        page = f.read().replace('@KEYS@', text)
    with open(output, 'w') as f:
        f.write(page)


main()
