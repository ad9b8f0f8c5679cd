"""The offline recipes that build the default models. They are not part of the installed package:
models/build.py registers this folder as the package `inferstream_recipes` (`load_recipe`), so the
recipes import each other relatively (`from . import interactions`)."""
