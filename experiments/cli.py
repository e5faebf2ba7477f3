"""absl flags for the experiments' entry points.

Each script defines its flags on a ``flags.FlagValues`` of its own (so several scripts
can be imported in one process, as the tests do, without clashing names) and has a
``main(argv)`` that takes the arguments after the program name, e.g.
``main(["--quick", "--json"])``::

  FLAGS = flags.FlagValues()
  flags.DEFINE_bool("quick", False, "A small grid.", flag_values=FLAGS)

  def main(argv=None):
    cli.parse(FLAGS, argv)
    ...

  if __name__ == "__main__":
    cli.run(main, FLAGS)

Run as a program, ``cli.run`` hands the script's flags to ``absl.app.run`` with absl's
own (``--help``, ``--helpfull``, ``--verbosity``, ...). Flags are written ``--name=value``
or ``--name value``; booleans ``--name`` / ``--noname``; a list flag takes
comma-separated values (``--ranks=4,8``).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import NoReturn

from absl import app, flags


def parse(fv: flags.FlagValues, argv: Sequence[str] | None = None) -> flags.FlagValues:
  """Parses ``argv`` (without the program name) into ``fv``, from its defaults.

  With ``argv=None`` the flags are those of the command line: already parsed by
  :func:`run`, or else read from ``sys.argv[1:]``. Unknown flags, bad values and
  positional arguments are a usage :func:`error`.
  """
  if argv is None:
    if flags.FLAGS.is_parsed() and all(flags.FLAGS[name] is fv[name] for name in fv):
      fv.mark_as_parsed()  # parsed by ``run`` (the same Flag objects)
      return fv
    argv = sys.argv[1:]
  fv.unparse_flags()
  try:
    rest = fv([sys.argv[0] if sys.argv and sys.argv[0] else "main", *argv])
  except flags.Error as e:
    error(str(e))
  if len(rest) > 1:
    error(f"unexpected arguments: {rest[1:]}")
  return fv


def error(message: str) -> NoReturn:
  """A usage error: ``error: message`` on stderr, exit status 2."""
  print(f"error: {message}", file=sys.stderr)
  raise SystemExit(2)


def run(main: Callable[[Sequence[str] | None], object], fv: flags.FlagValues) -> None:
  """``absl.app.run`` for a script whose flags are in ``fv``; exits with ``main``'s int."""
  module = sys.argv[0]
  for name in fv:
    flag = fv[name]
    flags.FLAGS[name] = flag
    flags.FLAGS.register_flag_by_module(module, flag)  # listed by --help

  def call(argv):
    if len(argv) > 1:
      error(f"unexpected arguments: {argv[1:]}")
    return main(None)

  app.run(call)
