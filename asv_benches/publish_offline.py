"""Make the page ``asv publish`` wrote draw its graphs with no network.

asv's ``index.html`` loads jQuery, flot, bootstrap and friends from CDNs.
This script fetches the same libraries as packages from the npm registry
(``npm pack``, cached under ``.asv/vendor-cache``), copies the needed files
into ``<html_dir>/vendor/`` and points the page at them. An asv release that
adds a CDN URL not listed below makes the script fail rather than publish a
page that silently needs the network.

Usage (from ``asv_benches/``, after ``asv publish``)::

    python publish_offline.py [.asv/html]
"""
import pathlib
import re
import shutil
import subprocess
import sys
import tarfile

HERE = pathlib.Path(__file__).resolve().parent
CACHE = HERE / ".asv" / "vendor-cache"

# CDN address in asv 0.6's index.html -> (npm package, file in its tarball).
# stupidtable 1.0.1 is not on npm; 1.1.3 has the same jQuery plugin API.
FILES = {
    "https://code.jquery.com/jquery-3.3.1.min.js":
        ("jquery@3.3.1", "dist/jquery.min.js"),
    "https://cdnjs.cloudflare.com/ajax/libs/flot/0.8.3/jquery.flot.min.js":
        ("flot@0.8.3", "jquery.flot.js"),
    "https://cdnjs.cloudflare.com/ajax/libs/flot/0.8.3/jquery.flot.time.min.js":
        ("flot@0.8.3", "jquery.flot.time.js"),
    "https://cdnjs.cloudflare.com/ajax/libs/flot/0.8.3/jquery.flot.selection.min.js":
        ("flot@0.8.3", "jquery.flot.selection.js"),
    "https://cdnjs.cloudflare.com/ajax/libs/flot/0.8.3/jquery.flot.categories.min.js":
        ("flot@0.8.3", "jquery.flot.categories.js"),
    "https://cdn.jsdelivr.net/npm/flot-orderbars@1.0.0/js/jquery.flot.orderBars.js":
        ("flot-orderbars@1.0.0", "js/jquery.flot.orderBars.js"),
    "https://cdnjs.cloudflare.com/ajax/libs/stupidtable/1.0.1/stupidtable.min.js":
        ("stupid-table-plugin@1.1.3", "stupidtable.min.js"),
    "https://cdnjs.cloudflare.com/ajax/libs/blueimp-md5/2.19.0/js/md5.min.js":
        ("blueimp-md5@2.19.0", "js/md5.min.js"),
    "https://cdn.jsdelivr.net/npm/bootstrap@3.1.1/dist/js/bootstrap.min.js":
        ("bootstrap@3.1.1", "dist/js/bootstrap.min.js"),
    "https://cdn.jsdelivr.net/npm/bootstrap@3.1.1/dist/css/bootstrap.min.css":
        ("bootstrap@3.1.1", "dist/css/bootstrap.min.css"),
}
# Files the copied ones load by relative path (bootstrap's icon font).
COMPANIONS = {("bootstrap@3.1.1", "dist/css/bootstrap.min.css"): "dist/fonts/"}

TAG = re.compile(r'<(script|link)\b[^>]*?(?:src|href)="(https?://[^"]+)"[^>]*>')


def package(spec):
    """The unpacked npm package ``spec`` (downloaded once into the cache)."""
    target = CACHE / spec
    if not target.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        name = subprocess.run(["npm", "pack", "--silent", spec], cwd=CACHE,
                              check=True, capture_output=True,
                              text=True).stdout.strip().splitlines()[-1]
        with tarfile.open(CACHE / name) as tar:
            tar.extractall(target, filter="data")
        (CACHE / name).unlink()
    return target / "package"


def localize(html_dir):
    """Copy the libraries next to ``index.html`` and rewrite its tags."""
    index = html_dir / "index.html"
    page = index.read_text()

    def replace(match):
        tag, url = match.group(1), match.group(2)
        if url not in FILES:
            raise SystemExit(f"unknown CDN address in {index}: {url}")
        spec, path = FILES[url]
        local = pathlib.Path("vendor") / spec / path
        (html_dir / local).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(package(spec) / path, html_dir / local)
        companion = COMPANIONS.get((spec, path))
        if companion:
            shutil.copytree(package(spec) / companion,
                            html_dir / "vendor" / spec / companion,
                            dirs_exist_ok=True)
        if tag == "script":
            return f'<script src="{local.as_posix()}" onerror="js_load_failure()">'
        return f'<link rel="stylesheet" href="{local.as_posix()}">'

    page = TAG.sub(replace, page)
    left = [url for _, url in TAG.findall(page)]
    if left:
        raise SystemExit(f"still loaded from the network: {left}")
    index.write_text(page)
    return sorted({spec for spec, _ in FILES.values()})


def main(argv):
    html_dir = pathlib.Path(argv[1] if len(argv) > 1 else HERE / ".asv" / "html")
    specs = localize(html_dir)
    print(f"{html_dir / 'index.html'}: loads {', '.join(specs)} from vendor/")


if __name__ == "__main__":
    main(sys.argv)
