// Hardware templates: the same workflows sized for each class of card, so a person on a small
// GPU starts from something that fits. Dimensions, tile sizes and chunk sizes follow the
// profiles' defaults (`nova profiles`); `extra_data.nova` carries the profile and tile size.

import type { ApiWorkflow } from "./layout";

export interface Template {
  id: string;
  label: string;
  profile: string;
  /** Tile side for image work, pixels. */
  tile: number;
  width: number;
  height: number;
  workflow: ApiWorkflow;
}

function imageChain(width: number, height: number, prefix: string): ApiWorkflow {
  return {
    "1": { class_type: "EmptyImage", inputs: { width, height, batch_size: 1, color: 0x3366aa } },
    "2": { class_type: "ImageSharpen", inputs: { image: ["1", 0], sharpen_radius: 2, sigma: 1.0, alpha: 0.5 } },
    "3": { class_type: "ImageScaleBy", inputs: { image: ["2", 0], upscale_method: "lanczos", scale_by: 1.5 } },
    "4": { class_type: "ImageBlur", inputs: { image: ["3", 0], blur_radius: 1, sigma: 0.5 } },
    "5": { class_type: "SaveImage", inputs: { images: ["4", 0], filename_prefix: prefix } },
  };
}

export const TEMPLATES: Template[] = [
  { id: "gtx1050", label: "GTX 1050 (2–4 GB)", profile: "PASCAL_2G", tile: 256, width: 512, height: 384, workflow: imageChain(512, 384, "gtx1050") },
  { id: "gtx1060", label: "GTX 1060 (6 GB)", profile: "PASCAL_6G_8G", tile: 384, width: 768, height: 576, workflow: imageChain(768, 576, "gtx1060") },
  { id: "gtx1080", label: "GTX 1070/1080 (8 GB)", profile: "PASCAL_6G_8G", tile: 512, width: 1024, height: 768, workflow: imageChain(1024, 768, "gtx1080") },
  { id: "rtx", label: "RTX (modern)", profile: "RTX_MODERN", tile: 1024, width: 1536, height: 1152, workflow: imageChain(1536, 1152, "rtx") },
];

/** `extra_data` for a template's run, with the tile side the user chose. */
export function extraData(t: Template, tile = t.tile): Record<string, unknown> {
  return { nova: { profile: t.profile, tile_size: tile } };
}
