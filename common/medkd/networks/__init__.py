"""Networks of the papers (students and teachers) and the tap-point registry shared by every network."""

from medkd.networks.taps import ALIAS_TABLES, register_tap_aliases, resolve_tap, tap_points_of

__all__ = ["ALIAS_TABLES", "register_tap_aliases", "resolve_tap", "tap_points_of"]
