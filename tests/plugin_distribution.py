"""Install a throw-away plugin package for one test: a module and a dist-info directory declaring its entry
points, on sys.path, exactly as `pip install` would leave a third-party plugin."""

import sys
import textwrap

# a backbone plugin whose contextualise returns half its width: the kit and the dry run each name the mistake once
NARROW_BACKBONE = '''
from robovlms.backbones.gpt_scratch import GPTScratchBackbone


class Narrow(GPTScratchBackbone):
    name = "narrow"
    description = "returns half its width"

    def contextualise(self, context, images, suffix_embeds):
        return super().contextualise(context, images, suffix_embeds)[..., :32]
'''


def install_plugin(tmp_path, monkeypatch, module: str, source: str | None, entry_points: dict[str, dict[str, str]],
                   distribution: str = "robovlms-broken", version: str = "0.2.0"):
    """`entry_points`: group -> name -> "module:attribute"; `source`: the module's code, None for a module
    already importable (one under tests/)."""
    site = tmp_path / "site-packages"
    site.mkdir(exist_ok=True)
    if source is not None:
        (site / f"{module}.py").write_text(textwrap.dedent(source))
    dist_info = site / f"{distribution.replace('-', '_')}-{version}.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {distribution}\nVersion: {version}\n")
    (dist_info / "entry_points.txt").write_text("".join(
        f"[{group}]\n" + "".join(f"{name} = {value}\n" for name, value in names.items())
        for group, names in entry_points.items()))
    monkeypatch.syspath_prepend(str(site))
    if source is not None:
        monkeypatch.delitem(sys.modules, module, raising=False)
