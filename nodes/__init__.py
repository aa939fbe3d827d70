"""ComfyUI nodes of the pack: thin V3 adapters around embroidery_core."""
from comfy_api.latest import ComfyExtension, io

from .diffstyler_nodes import DIFFSTYLER_NODES
from .method_nodes import METHOD_NODES
from .metrics_nodes import METRICS_NODES
from .style_nodes import STYLE_NODES
from .stylegallery_nodes import STYLEGALLERY_NODES
from .lora_nodes import EmbroideryLoRABlockInspector, EmbroiderySaveStyleLoRA, EmbroideryStyleBlocksLoader
from .training_nodes import (EmbroideryAnalogyPair, EmbroideryFindStyleBlocks, EmbroideryTrainStage1,
                             EmbroideryTrainStage2)

NODES: list[type[io.ComfyNode]] = [
    EmbroideryStyleBlocksLoader,
    EmbroiderySaveStyleLoRA,
    EmbroideryLoRABlockInspector,
    EmbroideryAnalogyPair,
    EmbroideryFindStyleBlocks,
    EmbroideryTrainStage1,
    EmbroideryTrainStage2,
    *METHOD_NODES,
    *STYLE_NODES,
    *DIFFSTYLER_NODES,
    *STYLEGALLERY_NODES,
    *METRICS_NODES,
]


class EmbroideryExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return NODES
