"""squeezekit's bundled policies. Each module is an ordinary plugin, loaded through the ``squeezekit`` entry-point
group exactly like a third-party one."""
