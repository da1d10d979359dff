"""Sphinx configuration of the API reference (``docs/api``).

Build (from the repository root; CI runs exactly this, warnings as errors)::

  sphinx-build -W --keep-going -n -b html docs/api docs/_build/api

The reference is autodoc over the docstrings, Google style (napoleon).
Single backticks are references (``default_role = 'py:obj'``), double
backticks are code. Nitpicky mode (``-n``) makes every reference that does
not resolve a warning, and ``-W`` makes a warning fail the build, so a
docstring that names something that no longer exists breaks CI.

Docstrings often name an object relative to a sibling module
(`rounds.message_sums` in ``fedjax_pfi.algorithms.fedavg``), relative to the
module that defines them while the reference documents them under the
package root (`check` in ``fedjax_pfi.default_config``, defined in
``fedjax_pfi.config``), or by a re-exported name (`fed_partitioned`).
`resolve_suffix` resolves what Sphinx could not: first as Python would look
the name up from the docstring's object (its class, then its module, under
its documented and its defining name), then by a UNIQUE dotted-suffix match
among the documented objects' full names (documented, defining, or
re-exported by a documented module's ``__all__``). An ambiguous or unmatched
name still warns, and so fails the build.

No intersphinx (the build runs offline): third-party names are ignored by
`nitpick_ignore_regex`, narrowly.
"""

import importlib
import os
import sys

from sphinx import addnodes
from sphinx.util import logging
from sphinx.util.nodes import make_refnode

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), '..', '..')))

project = 'fedjax_pfi'

extensions = ['sphinx.ext.autodoc', 'sphinx.ext.napoleon']

default_role = 'py:obj'
nitpicky = True
exclude_patterns = ['_build']
html_theme = 'alabaster'

autodoc_member_order = 'bysource'
autodoc_typehints = 'signature'
autodoc_preserve_defaults = True
autodoc_default_options = {'members': True, 'show-inheritance': False}

napoleon_google_docstring = True
napoleon_numpy_docstring = False
# ``Attributes:`` as attributes of the class, so that `Cohort.mask` is a
# reference (a NamedTuple's generated field properties are skipped below).
napoleon_use_ivar = False

# Third-party names (in signatures, and a few in docstrings), which nothing
# here documents: intersphinx would need the network. Builtins resolve.
nitpick_ignore_regex = [
    (r'py:(class|obj)', r'(jax|numpy|np|optax|flax|ml_collections|dp_accounting)\..+'),
    ('py:class', r'os\.PathLike|pathlib\.Path|collections\.abc\.\w+'),
    # ``Params = Any``: the modules' alias for a params pytree.
    ('py:class', 'Params'),
    # Flax modules' dataclass field ``parent``, in their signatures.
    ('py:class', r'Union\[flax\.linen\.module\.Module'),
]


def skip_namedtuple_fields(app, what, name, obj, skip, options):
  """A NamedTuple's fields are its docstring's ``Attributes:``; skip the
  generated ``Alias for field number N`` properties."""
  del app, what, name, options
  doc = getattr(obj, '__doc__', None) or ''
  if doc.startswith('Alias for field number'):
    return True
  return skip


def _canonical(fullname):
  """``module.qualname`` of the object documented as ``fullname`` (an
  attribute without one: its owner's, dot its name), or None."""
  parts = fullname.split('.')
  for i in range(len(parts), 0, -1):
    try:
      obj = importlib.import_module('.'.join(parts[:i]))
    except ImportError:
      continue
    chain = [obj]
    try:
      for attr in parts[i:]:
        chain.append(getattr(chain[-1], attr))
    except AttributeError:
      return None
    break
  else:
    return None
  names = ['.'.join(parts[:i])] + parts[i:]
  for depth in range(len(chain) - 1, -1, -1):
    obj = chain[depth]
    if isinstance(obj, type(sys)):
      own = obj.__name__
    else:
      module = getattr(obj, '__module__', None)
      qualname = getattr(obj, '__qualname__', None)
      if not (isinstance(module, str) and isinstance(qualname, str)) or '<locals>' in qualname:
        continue
      own = f'{module}.{qualname}'
    return '.'.join([own] + names[depth + 1:])
  return None


_NAMES = {}


def _names(env):
  """Every documented Python object: name -> {(docname, node_id, objtype)},
  the name being its documented full name, its canonical one, or a name a
  documented module's ``__all__`` re-exports it as."""
  objects = env.domains['py'].objects
  if _NAMES.get('key') == (id(env), len(objects)):
    return _NAMES['names']
  names = {}
  for fullname, entry in objects.items():
    target = (entry.docname, entry.node_id, entry.objtype)
    names.setdefault(fullname, set()).add(target)
    canonical = _canonical(fullname)
    if canonical and canonical != fullname:
      names.setdefault(canonical, set()).add(target)
  # A module's ``__all__`` names what it re-exports: ``fedjax_pfi.partition``
  # is the module ``fedjax_pfi.data.partition``.
  by_canonical = {}
  for fullname, targets in names.items():
    by_canonical.setdefault(_canonical(fullname) or fullname, set()).update(targets)
  for fullname, entry in objects.items():
    if entry.objtype != 'module':
      continue
    module = sys.modules.get(fullname)
    for name in getattr(module, '__all__', ()):
      canonical = _canonical(f'{fullname}.{name}')
      if canonical in by_canonical:
        names.setdefault(f'{fullname}.{name}', set()).update(by_canonical[canonical])
  _NAMES.update(key=(id(env), len(objects)), names=names)
  return names


def _scopes(node):
  """Where a name in ``node``'s docstring is looked up first, as Python
  would: the class, then the module, of the object whose docstring it is,
  under the name it is documented as and the name of its definition
  (`build` in ``fedjax_pfi.default_config``'s docstring is looked up in
  ``fedjax_pfi.config``, which defines it)."""
  module, cls = node.get('py:module'), node.get('py:class')
  scopes = [f'{module}.{cls}'] if module and cls else []
  scopes += [module] if module else []
  parent = node.parent
  while parent is not None and not isinstance(parent, addnodes.desc):
    parent = parent.parent
  if parent is not None:
    for sig in parent.findall(addnodes.desc_signature):
      if sig.get('module') and sig.get('fullname'):
        canonical = _canonical(f"{sig['module']}.{sig['fullname']}") or ''
        parts = canonical.split('.')[:-1]
        while parts:
          scopes.append('.'.join(parts))
          if '.'.join(parts) in sys.modules:
            break
          parts.pop()
      break
  return scopes


def resolve_suffix(app, env, node, contnode):
  """A Python reference Sphinx could not resolve: first in `_scopes`, then
  by a unique dotted-suffix match among `_names` (`rounds.message_sums` is
  ``fedjax_pfi.algorithms.rounds.message_sums``); None (Sphinx's warning)
  when no name or more than one matches, with the candidates logged."""
  if node.get('refdomain') != 'py':
    return None
  target = node['reftarget'].lstrip('.~')
  if not target:
    return None
  names = _names(env)
  for scope in _scopes(node):
    if f'{scope}.{target}' in names and len(names[f'{scope}.{target}']) == 1:
      matches = set(names[f'{scope}.{target}'])
      break
  else:
    matches = set()
    for name, targets in names.items():
      if name == target or name.endswith('.' + target):
        matches |= targets
  if len(matches) != 1:
    if len(matches) > 1:
      logging.getLogger(__name__).warning(
          'ambiguous reference %r: %s', target,
          ', '.join(sorted(node_id for _, node_id, _ in matches)),
          location=node)
    return None
  docname, node_id, _ = matches.pop()
  return make_refnode(app.builder, node['refdoc'], docname, node_id, contnode, target)


def setup(app):
  app.connect('autodoc-skip-member', skip_namedtuple_fields)
  app.connect('missing-reference', resolve_suffix)
