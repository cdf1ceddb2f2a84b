"""A prelude for ``python -c`` that makes any import of torch in that process fail (its Ray
workers are other processes, unaffected): distcl's drivers (``distcl run``, ``distcl tune``)
must not need torch; only the Train workers run it.

    subprocess.Popen([sys.executable, "-c", NO_TORCH + "from distcl.cli import main; ..."])
"""

NO_TORCH = (
    "import sys\n"
    "class _NoTorch:\n"
    "    def find_spec(self, name, path=None, target=None):\n"
    "        if name == 'torch' or name.startswith('torch.'):\n"
    "            raise ImportError('torch imported in a distcl driver (tests/notorch.py)')\n"
    "sys.meta_path.insert(0, _NoTorch())\n"
)
