"""The read-only web status page (``web_listen``): HTTPS with the replica's
own certificate, access by operator client certificate, bearer token or a
session cookie; pages rendered on the server from the read RPCs' data.

``auth`` decides who gets in (pure but for reading the token file),
``svg`` draws the expiry timeline, ``views`` turns the read methods'
answers into pages, ``app`` wires the aiohttp application and its TLS."""
