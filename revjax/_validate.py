"""Argument checks shared by the public entry points, so every one words its errors alike.

Each check names the caller (``where``) and the argument; ``positive_int`` returns the value as a
Python ``int`` (a NumPy integer is accepted), so equal settings compare and hash equal.
"""

import numbers


def positive_int(value: object, name: str, where: str) -> int:
    """``int(value)`` when ``value`` is an integer >= 1 (Python or NumPy; ``bool`` refused).

    Raises:
      ValueError: ``value`` is not such an integer; the message names ``where`` and ``name``.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{where}: {name} must be a positive int, got {value!r}")
    return int(value)


def check_dropout_rate(rate: float, where: str) -> None:
    """Refuse a dropout rate outside ``[0, 1)`` (NaN included; rate 1 would divide by zero in
    inverted dropout).

    Raises:
      ValueError: ``not 0 <= rate < 1``; the message names ``where`` and the rate.
    """
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"{where}: dropout rate must lie in [0, 1), got {rate!r}")
