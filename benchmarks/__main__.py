"""``python -m benchmarks``: see :mod:`benchmarks.run`; ``... soak``: see :mod:`benchmarks.soak`;
``... drain-latency``: see :mod:`benchmarks.drain_latency`; ``... delayed-delivery``: see
:mod:`benchmarks.delayed_delivery`; ``... client-cost``: see :mod:`benchmarks.client_cost`; ``... idle``: see
:mod:`benchmarks.idle`; ``... cluster``: see :mod:`benchmarks.cluster`; ``... rate-limits``: see
:mod:`benchmarks.rate_limits`; ``... server-cost``: see :mod:`benchmarks.server_cost`."""
import sys

if sys.argv[1:2] == ['soak']:
    from benchmarks.soak import main

    sys.exit(main(sys.argv[2:]))

if sys.argv[1:2] == ['drain-latency']:
    from benchmarks.drain_latency import main

    sys.exit(main(sys.argv[2:]))

if sys.argv[1:2] == ['delayed-delivery']:
    from benchmarks.delayed_delivery import main

    sys.exit(main(sys.argv[2:]))

if sys.argv[1:2] == ['idle']:
    from benchmarks.idle import main

    sys.exit(main(sys.argv[2:]))

if sys.argv[1:2] == ['client-cost']:
    from benchmarks.client_cost import main

    sys.exit(main(sys.argv[2:]))

if sys.argv[1:2] == ['cluster']:
    from benchmarks.cluster import main

    sys.exit(main(sys.argv[2:]))

if sys.argv[1:2] == ['rate-limits']:
    from benchmarks.rate_limits import main

    sys.exit(main(sys.argv[2:]))

if sys.argv[1:2] == ['server-cost']:
    from benchmarks.server_cost import main

    sys.exit(main(sys.argv[2:]))

from benchmarks.run import main  # noqa: E402

sys.exit(main())
