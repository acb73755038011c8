"""Build the scratch extension in place: ``python setup.py build_ext --inplace`` (needs Cython and g++)."""
from Cython.Build import cythonize
from setuptools import setup

setup(ext_modules=cythonize("cfold.pyx", language_level=3))
