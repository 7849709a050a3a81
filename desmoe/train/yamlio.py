"""YAML as users write it: PyYAML's safe loader, with floats spelled the YAML 1.2 / Python way.

PyYAML follows YAML 1.1, whose floats need a dot and a signed exponent, so ``1e-5``, ``1E-5``, ``1e+3`` and
``-.5`` load as *strings* there (and a float field then refuses them). :class:`Loader` also reads those as floats;
``.nan`` / ``.inf`` stay floats (the config's checks refuse them), plain ``nan`` / ``inf`` stay strings.
:class:`Dumper` quotes every string that :class:`Loader` would read as a float (a name like ``"1e5"``), so what
desmoe writes loads back unchanged. A key given twice in one mapping is an error naming the key and both lines
(PyYAML keeps the last silently, so an edited value could be overridden unseen further down); ``<<`` merges may
still be overridden. Every YAML desmoe reads from users goes through :func:`load`.
"""
from __future__ import annotations

import re

import yaml

# a dot or an exponent (or both) is required, so ints stay ints; "_" digit separators as PyYAML allows them
FLOAT_RE = re.compile(r"""^[-+]?(?:[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                                  |\.[0-9][0-9_]*(?:[eE][-+]?[0-9]+)?
                                  |[0-9][0-9_]*[eE][-+]?[0-9]+)$""", re.X)
_FLOAT_TAG = "tag:yaml.org,2002:float"


class Loader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that also reads ``1e-5``, ``1E+3``, ``-.5`` as floats."""


class Dumper(yaml.SafeDumper):
    """``yaml.SafeDumper`` that quotes strings :class:`Loader` would read as floats."""


for _cls in (Loader, Dumper):
    _cls.add_implicit_resolver(_FLOAT_TAG, FLOAT_RE, list("-+0123456789."))


def _mapping_without_duplicates(loader, node, deep=False):
    seen = {}
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge" or not isinstance(key_node, yaml.ScalarNode):
            continue
        key = loader.construct_object(key_node, deep=True)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                "while constructing a mapping", node.start_mark,
                f"found duplicate key {key!r} (first given on line {seen[key] + 1}); each key may appear once",
                key_node.start_mark)
        seen[key] = key_node.start_mark.line
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


def _construct_map(loader, node):
    data = {}
    yield data
    data.update(_mapping_without_duplicates(loader, node))


Loader.add_constructor("tag:yaml.org,2002:map", _construct_map)


def load(stream):
    """The YAML document in ``stream`` (a string or an open file), read with :class:`Loader`."""
    return yaml.load(stream, Loader=Loader)


def dump(data, **kw) -> str:
    """``yaml.safe_dump`` with :class:`Dumper`."""
    return yaml.dump(data, Dumper=Dumper, **kw)
