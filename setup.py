"""Ships the top-level kernels/ sources inside the package as ``fieldkit.kernels`` (package data),
so the native backends can build just in time from an installed wheel too."""

from setuptools import find_packages, setup

setup(
    packages=find_packages(include=["fieldkit", "fieldkit.*"]) + ["fieldkit.kernels"],
    package_dir={"fieldkit.kernels": "kernels"},
    package_data={"fieldkit": ["py.typed"], "fieldkit.kernels": ["**/*.h", "**/*.cuh", "**/*.cpp", "**/*.cu", "**/*.inl"]},
)
