"""
The daemon: configuration, listeners, the hub that wires everything, the
service, drain, reload, metrics, systemd sockets, TLS, the twistd plugin's
options and the xcauth-daemon entry point.
"""
