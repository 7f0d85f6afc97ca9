"""A seeded image catalogue, a local fault-injecting image server and sample shards.

Not part of the product: installed with the `dev` extra for the tests, the benchmarks and
`make demo`. Every network behaviour the fetcher must
survive (404/500/503/429, resets, trickles, truncated bodies, HTML pages, oversize bodies,
decompression bombs, redirects to private addresses, gzip, opt-out headers) and every image
oddity clean must handle (CMYK, palette transparency, EXIF rotation, tiny, huge, duplicates,
placeholders, leaks) is produced here from real bytes, served over real HTTP on loopback.

    catalogue = build_catalogue("faults", seed=0)
    async with SampleServer(catalogue) as srv:
        write_lists(catalogue, srv, tmp_path)          # train.json, val.json, test.json
        ...                                             # fetch http://127.0.0.1:PORT/...
        srv.counter["/404/....jpg"], srv.max_concurrency("localhost")

`python -m imatsample serve --out DIR [--kind demo] [--seed 0]` runs it for the demo.
"""

from imatsample.catalogue import (
    EXPECTED_STATUSES,
    HOSTS,
    MIB,
    PRIVATE_REDIRECT,
    Catalogue,
    Item,
    TinyRange,
    big_catalogue,
    build_catalogue,
    product_classes,
    two_host_trickles,
)
from imatsample.images import (
    encode,
    jpeg_bomb,
    photo_corpus,
    png_bomb,
    product_style,
    render_product,
)
from imatsample.lists import write_lists
from imatsample.server import SampleServer, serve_in_thread

__all__ = ["EXPECTED_STATUSES", "HOSTS", "MIB", "PRIVATE_REDIRECT", "Catalogue", "Item", "SampleServer",
           "TinyRange", "big_catalogue", "build_catalogue", "encode", "jpeg_bomb", "photo_corpus",
           "png_bomb", "product_classes", "product_style", "render_product", "serve_in_thread",
           "two_host_trickles", "write_lists"]
