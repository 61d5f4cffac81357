import sys
from pathlib import Path

# Make `import helpers` work from any test file without installing the tests as a package.
sys.path.insert(0, str(Path(__file__).parent))
