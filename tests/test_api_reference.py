"""The API reference (``docs/api``) covers the public API, documented.

Sphinx itself runs in CI as its own step (``sphinx-build -W --keep-going -n
-b html docs/api docs/_build/api``), so that a broken docstring reference
fails the build. This test is the cheap part, no Sphinx: every name of
``fedjax_pfi.__all__`` and every public member of an exported module has a
docstring, and every name of ``__all__`` has exactly one place in the
reference's pages (one page per group), so that a new export without one
fails here.
"""

import inspect
import os
import re
import types

import fedjax_pfi

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
API = os.path.join(ROOT, 'docs', 'api')
DIRECTIVE = re.compile(
    r'^\.\. auto(module|class|function|exception|data)::[ \t]*(\S+)[ \t]*\n'
    r'((?:[ \t]+\S.*\n?)*)', re.M)
MIN_WORDS = 20


def _pages():
  """Group page name -> its directives ``(kind, target, excluded names)``."""
  pages = {}
  for name in sorted(os.listdir(API)):
    if not name.endswith('.rst') or name == 'index.rst':
      continue
    with open(os.path.join(API, name)) as f:
      text = f.read()
    directives = []
    for kind, target, options in DIRECTIVE.findall(text):
      excluded = re.search(r':exclude-members:((?:.*\n?)(?:[ \t]+[^:\s].*\n?)*)',
                           options)
      names = set(re.findall(r'\w+', excluded.group(1))) if excluded else set()
      directives.append((kind, target, names))
    pages[name] = directives
  return pages


def _exported_modules():
  return {name: getattr(fedjax_pfi, name) for name in fedjax_pfi.__all__
          if isinstance(getattr(fedjax_pfi, name), types.ModuleType)}


def _public_members(module):
  """What autodoc's ``:members:`` documents: the module's ``__all__``, else
  its names not starting with ``_``; functions and classes it defines."""
  names = getattr(module, '__all__', None)
  if names is None:
    names = [n for n in vars(module) if not n.startswith('_')]
  for name in names:
    obj = getattr(module, name)
    if ((inspect.isfunction(obj) or inspect.isclass(obj)) and
        obj.__module__ == module.__name__):
      yield name, obj


def _words(doc):
  return len((doc or '').split())


def test_every_public_name_has_a_docstring():
  thin = [name for name in fedjax_pfi.__all__
          if _words(inspect.getdoc(getattr(fedjax_pfi, name))) < MIN_WORDS]
  assert not thin, f'fedjax_pfi.__all__ names with no real docstring: {thin}'


def test_exported_modules_document_their_public_members():
  missing = []
  for name, module in _exported_modules().items():
    if _words(module.__doc__) < MIN_WORDS:
      missing.append(module.__name__)
    for member, obj in _public_members(module):
      if not (obj.__doc__ or '').strip():
        missing.append(f'{module.__name__}.{member}')
      if not inspect.isclass(obj):
        continue
      for attr, value in vars(obj).items():
        value = getattr(value, '__func__', value)
        if not attr.startswith('_') and (inspect.isfunction(value) or
                                         isinstance(value, property)):
          if not (value.__doc__ or '').strip():
            missing.append(f'{module.__name__}.{member}.{attr}')
  assert not missing, f'public, exported and without a docstring: {missing}'


def test_every_public_name_is_in_exactly_one_group():
  pages = _pages()
  assert pages, f'no group pages in {API}'
  places = {name: [] for name in fedjax_pfi.__all__}
  for page, directives in pages.items():
    for kind, target, excluded in directives:
      for name, obj in ((n, getattr(fedjax_pfi, n)) for n in places):
        if isinstance(obj, types.ModuleType):
          # a module: its own automodule (by the name that imports it)
          if kind == 'module' and target == obj.__name__:
            places[name].append(page)
        elif target == f'fedjax_pfi.{name}':
          places[name].append(page)
        elif (kind == 'module' and target == getattr(obj, '__module__', None)
              and name not in excluded and
              any(o is obj for _, o in _public_members(
                  __import__(target, fromlist=['_'])))):
          # documented a second time by its defining module's :members:
          places[name].append(f'{page} (automodule {target})')
  wrong = {name: where for name, where in places.items() if len(where) != 1}
  assert not wrong, (
      'each name of fedjax_pfi.__all__ needs exactly one place in '
      f'docs/api/*.rst (autofunction/autoclass fedjax_pfi.NAME, or the '
      f"automodule of an exported module; exclude it from its defining "
      f"module's automodule): {wrong}")
