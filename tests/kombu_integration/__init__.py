"""kombu 5.7.0's transport integration base classes (``t/integration/common.py``).

Vendored for ``tests/test_kombu_contract.py``; see the license in ``common.py``.
"""
