"""``--cfg-options KEY=VALUE ...`` for argparse: mmengine's ``DictAction`` with bad items refused in one line.

Shared by the mm entry points (``python -m dap_pretrain.mm.train``; ``downstream/transfer.py`` can use it too):
``parser.add_argument('--cfg-options', nargs='+', action=CfgOptions, default=None)``. An item without ``=``, or
one whose value mmengine cannot parse (``a=[1,2``), calls ``parser.error`` (one line, exit code 2) where
``DictAction`` would raise a traceback.
"""

from __future__ import annotations

import argparse

from mmengine.config import DictAction


class CfgOptions(DictAction):
    """``DictAction`` (``key.path=value``, lists, tuples, ``None``/booleans); bad items go to ``parser.error``."""

    def __call__(self, parser: argparse.ArgumentParser, namespace, values, option_string=None) -> None:
        flag = option_string or self.dest
        for item in values:
            key = item.partition("=")[0]
            if "=" not in item or not key:
                parser.error(f"{flag} {item!r} is not KEY=VALUE; write e.g. {flag} train_cfg.max_epochs=4")
        try:
            super().__call__(parser, namespace, values, option_string)
        except (ValueError, AssertionError, IndexError) as e:  # DictAction's parsing of a malformed value
            parser.error(f"{flag}: cannot parse {' '.join(values)!r} ({e}); write KEY=VALUE with balanced brackets")
