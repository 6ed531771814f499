"""Private dbus-daemons with limits other than the integration suite's (its Bus class, another
configuration)."""

import pincache_integration_conftest as _integration

POLICY = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>pincache-reliability</type>
  <listen>unix:path={{socket}}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow send_destination="*" eavesdrop="true"/>
    <allow eavesdrop="true"/>
    <allow own="*"/>
  </policy>
{limits}
</busconfig>
"""


def bus_with_limits(tmp_path, **limits):
    """A started Bus whose <limit name=K>V</limit> are `limits` (dbus-daemon defaults otherwise)."""
    d = tmp_path / "bus"
    d.mkdir()
    text = "\n".join(f'  <limit name="{k}">{v}</limit>' for k, v in limits.items())
    saved = _integration.BUS_CONFIG
    _integration.BUS_CONFIG = POLICY.format(limits=text)
    try:
        return _integration.Bus(d)
    finally:
        _integration.BUS_CONFIG = saved
