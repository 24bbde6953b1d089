"""A node's network perimeter: what reaches its Syft server, who may call it, and how.

One module per idea: :mod:`.tls` makes the node's certificates, :mod:`.allow_list` says
which caller may use which Syft path, :mod:`.login_limit` slows password guessing,
:mod:`.hook` applies both inside the Syft server before Syft dispatches anything,
:mod:`.approval` decides on code requests, :mod:`.private_files` keeps the workdir to the
node's user, :mod:`.frame_stage` holds a call's frames while the Syft call carries only
their digest and :mod:`.frame_route` is fedseg's own route for them, and :mod:`.server`
runs the Syft server process with all of them. Syft is imported only inside the server
process and the functions that need it.
"""
