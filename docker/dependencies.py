"""Print the requirements of pyproject.toml (with the given extras), one per line, for a Docker layer
that installs dependencies before the sources are copied:  python dependencies.py pyproject.toml worker"""

import sys
import tomllib

with open(sys.argv[1], "rb") as handle:
    project = tomllib.load(handle)["project"]
requirements = list(project["dependencies"])
for extra in sys.argv[2:]:
    requirements += project["optional-dependencies"][extra]
print("\n".join(requirements))
