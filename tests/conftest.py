import os

# Tests compare against float32 references; keep XLA's CPU matmuls at full precision.
os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")

import hypothesis

hypothesis.settings.register_profile("ci", max_examples=20, deadline=None, derandomize=True)
hypothesis.settings.load_profile("ci")
