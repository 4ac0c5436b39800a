"""This project's modules have plain top-level names (config, data, engine, ...). A module
of the same name that Python finds first, such as a notebook's own config.py imported
before ours or placed earlier on sys.path, would be used in its place and fail far from the
cause: ``check()`` names it in one line. cpu_settings (imported first by every script and
by the notebook) calls it."""
import importlib.util
import os
import sys

ROOT = os.path.dirname(os.path.realpath(__file__))


def our_names():
    """The top-level modules and packages of this project."""
    return sorted(name[:-3] if name.endswith(".py") else name for name in os.listdir(ROOT)
                  if name.endswith(".py") or os.path.isfile(os.path.join(ROOT, name, "__init__.py")))


def origin_of(name):
    """The file Python uses (or would use) for ``name``, or None where none is found."""
    module = sys.modules.get(name)
    if module is not None:
        return getattr(module, "__file__", None)
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    return spec.origin if spec is not None else None


def shadowed():
    """(name, the other file) for the first of our modules Python takes from elsewhere, or None."""
    for name in our_names():
        origin = origin_of(name)
        if origin and not os.path.realpath(origin).startswith(ROOT + os.sep):
            return name, origin
    return None


def check():
    found = shadowed()
    if found is not None:
        name, origin = found
        sys.exit(f"error: {origin} is imported as this project's {name} ({os.path.join(ROOT, name)}): rename "
                 f"yours, or restart the kernel and import cpu_settings first with {ROOT} first on sys.path")
