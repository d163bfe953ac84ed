"""The 3D structure view (3Dmol.js through py3Dmol), served from the local copy with a CDN fallback."""
from __future__ import annotations

import inspect

import py3Dmol
from pymatgen.core import Structure
from pymatgen.io.cif import CifWriter

LOCAL_3DMOL = "/app/static/vendor/3Dmol-min.js"  # scripts/fetch_3dmol.sh, served by enableStaticServing
CDN_3DMOL = inspect.signature(py3Dmol.view).parameters["js"].default  # the version py3Dmol was built for
VIEWER_STYLES = {
    "ball and stick": {"sphere": {"scale": 0.3}, "stick": {"radius": 0.15}},
    "spheres": {"sphere": {"scale": 0.6}},
    "sticks": {"stick": {"radius": 0.2}},
    "lines": {"line": {}},
}


def viewer_html(structure: Structure, supercell: tuple[int, int, int] = (1, 1, 1), labels: bool = False,
                style: str = "ball and stick", height: int = 420) -> str:
    """A 3Dmol.js view of the structure, loaded from the local copy with the CDN as fallback.

    The model is the full P1 cell: 3Dmol reads only the asymmetric unit of a symmetrised CIF
    unless asked to assemble it, so expanding first is the simple, reliable way.
    """
    view = py3Dmol.view(width="100%", height=height, js=CDN_3DMOL)
    view.addModel(str(CifWriter(structure)), "cif")
    view.setStyle(VIEWER_STYLES[style])
    view.addUnitCell()
    if tuple(supercell) != (1, 1, 1):
        view.replicateUnitCell(*supercell)
    if labels:
        view.addPropertyLabels("elem", {}, {"fontColor": "black", "backgroundOpacity": 0.2, "fontSize": 12})
    # 3Dmol looks down c by default; tilt so c points up and a long c axis is seen side-on.
    view.rotate(-80, "x")
    view.rotate(25, "y")
    view.zoomTo()
    # py3Dmol loads 3Dmol.js only if $3Dmolpromise is undefined: define it first, local then CDN.
    loader = f"""<script>
var $3Dmolpromise = new Promise(function(resolve, reject) {{
  function load(urls) {{
    if (!urls.length) {{ reject(new Error("3Dmol.js could not be loaded")); return; }}
    var tag = document.createElement("script");
    tag.src = urls[0];
    tag.onload = resolve;
    tag.onerror = function() {{ tag.remove(); load(urls.slice(1)); }};
    document.head.appendChild(tag);
  }}
  load(["{LOCAL_3DMOL}", "{CDN_3DMOL}"]);
}});
</script>"""
    return loader + view.write_html()
