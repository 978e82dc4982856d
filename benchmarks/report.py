"""What every benchmark writes beside its numbers: the environment, and its docs section.

docs/benchmarks.md is shared by several scripts; each owns one '## ' section
and only ever appends a dated block to it, so no run overwrites another's.
"""

import datetime
import os
import platform

import jax

from moco_jax.core import files

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS_PATH = os.path.join(ROOT, 'docs', 'benchmarks.md')


def environment_line() -> str:
  """Device (or CPU model and load), versions and date, for the record next to every table."""
  import flax  # pylint: disable=g-import-not-at-top
  import jaxlib  # pylint: disable=g-import-not-at-top
  devices = jax.devices()
  date = datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')
  line = f'{len(devices)}x {devices[0].device_kind} ({devices[0].platform})'
  if devices[0].platform == 'cpu':
    cpu = platform.processor() or 'unknown CPU'
    try:
      with open('/proc/cpuinfo') as f:
        cpu = next(l.split(':', 1)[1].strip() for l in f if l.startswith('model name'))
    except (OSError, StopIteration):
      pass
    load = ', '.join(f'{x:.1f}' for x in os.getloadavg())
    line += (f' on {cpu}, {os.cpu_count()} cores shared with other jobs (load average {load}: '
             'numbers are noisy)')
  line += (f', Python {platform.python_version()}, jax {jax.__version__}, '
           f'jaxlib {jaxlib.__version__}, flax {flax.__version__}, {date}')
  if os.environ.get('XLA_FLAGS'):
    line += f', XLA_FLAGS={os.environ["XLA_FLAGS"].strip()}'
  return line


def append_section(section: str, block: str, intro: str = '', path: str = DOCS_PATH) -> None:
  """Adds `block` at the end of `section` ('## ...'), creating the file or section if needed.

  A new section starts with `intro` (what is measured and how to read it).
  Other sections belong to other benchmarks and are left as they are; the file
  is replaced atomically, so a concurrent reader never sees half of it.
  """
  text = open(path).read() if os.path.exists(path) else ''
  if not text.strip():
    text = '# Benchmarks\n'
  lines = text.splitlines(keepends=True)
  start = next((i for i, line in enumerate(lines) if line.rstrip() == section), None)
  block = block.rstrip('\n') + '\n'
  if start is None:
    intro = intro.rstrip('\n') + '\n\n' if intro else ''
    text = text.rstrip('\n') + f'\n\n{section}\n\n' + intro + block
  else:
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith('## ')),
               len(lines))
    after = ''.join(lines[end:])
    text = ''.join(lines[:end]).rstrip('\n') + '\n\n' + block + ('\n' + after if after else '')
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  files.atomic_write(path, lambda f: f.write(text))
