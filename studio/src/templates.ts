// Hardware templates: the same workflows sized for each class of card, so a person on a small
// GPU starts from something that fits. Dimensions, tile sizes, video windows and the quality
// mode follow the profiles (`nova profiles`); `extra_data.nova` carries the profile and tile
// size. Each card has an image, a video and an audio preset; none needs an input file.

import type { ApiWorkflow } from "./layout";

export type Kind = "image" | "video" | "audio";
/** Resampling quality: the cheaper filters on the smaller cards. */
export type Quality = "fast" | "balanced" | "quality";

export interface Hardware {
  id: string;
  label: string;
  profile: string;
  /** Tile side for image work, pixels. */
  tile: number;
  width: number;
  height: number;
  /** Frames per video window, and the clip's size. */
  window: number;
  video: { width: number; height: number; frames: number };
  quality: Quality;
}

export interface Template {
  id: string;
  label: string;
  kind: Kind;
  profile: string;
  tile: number;
  workflow: ApiWorkflow;
}

export const HARDWARE: Hardware[] = [
  {
    id: "gtx1050",
    label: "GTX 1050 (2–4 GB)",
    profile: "PASCAL_2G",
    tile: 256,
    width: 512,
    height: 384,
    window: 4,
    video: { width: 256, height: 144, frames: 24 },
    quality: "fast",
  },
  {
    id: "gtx1060",
    label: "GTX 1060 (6 GB)",
    profile: "PASCAL_6G_8G",
    tile: 384,
    width: 768,
    height: 576,
    window: 8,
    video: { width: 426, height: 240, frames: 32 },
    quality: "balanced",
  },
  {
    id: "gtx1080",
    label: "GTX 1070/1080 (8 GB)",
    profile: "PASCAL_6G_8G",
    tile: 512,
    width: 1024,
    height: 768,
    window: 8,
    video: { width: 640, height: 360, frames: 32 },
    quality: "quality",
  },
  {
    id: "rtx",
    label: "RTX (modern)",
    profile: "RTX_MODERN",
    tile: 1024,
    width: 1536,
    height: 1152,
    window: 16,
    video: { width: 1280, height: 720, frames: 48 },
    quality: "quality",
  },
];

const METHOD: Record<Quality, string> = { fast: "bilinear", balanced: "bicubic", quality: "lanczos" };

function imageChain(h: Hardware): ApiWorkflow {
  return {
    "1": { class_type: "EmptyImage", inputs: { width: h.width, height: h.height, batch_size: 1, color: 0x3366aa } },
    "2": { class_type: "ImageSharpen", inputs: { image: ["1", 0], sharpen_radius: 2, sigma: 1.0, alpha: 0.5 } },
    "3": { class_type: "ImageScaleBy", inputs: { image: ["2", 0], upscale_method: METHOD[h.quality], scale_by: 1.5 } },
    "4": { class_type: "ImageBlur", inputs: { image: ["3", 0], blur_radius: 1, sigma: 0.5 } },
    "5": { class_type: "SaveImage", inputs: { images: ["4", 0], filename_prefix: `${h.id}_image` } },
  };
}

function videoChain(h: Hardware): ApiWorkflow {
  const v = h.video;
  return {
    "1": { class_type: "EmptyImage", inputs: { width: v.width, height: v.height, batch_size: v.frames, color: 0x228844 } },
    "2": { class_type: "CreateVideo", inputs: { images: ["1", 0], fps: 24.0 } },
    "3": { class_type: "ImageSharpen", inputs: { image: ["2", 0], sharpen_radius: 1, sigma: 1.0, alpha: 0.5 } },
    "4": {
      class_type: "SaveVideo",
      inputs: { video: ["3", 0], filename_prefix: `${h.id}_video`, format: "webm", codec: "vp9", window: h.window },
    },
  };
}

function audioChain(h: Hardware): ApiWorkflow {
  return {
    "1": {
      class_type: "AudioOscillator",
      inputs: { waveform: "sine", frequency: 330.0, amplitude: 0.3, duration: 3.0, sample_rate: 48000, channels: 2 },
    },
    "2": { class_type: "AudioFade", inputs: { audio: ["1", 0], fade_in: 0.2, fade_out: 0.5 } },
    "3": { class_type: "SaveAudio", inputs: { audio: ["2", 0], filename_prefix: `${h.id}_audio` } },
  };
}

const KINDS: Array<[Kind, string, (h: Hardware) => ApiWorkflow]> = [
  ["image", "image", imageChain],
  ["video", "video", videoChain],
  ["audio", "audio", audioChain],
];

export const TEMPLATES: Template[] = HARDWARE.flatMap((h) =>
  KINDS.map(([kind, name, make]) => ({
    id: `${h.id}-${kind}`,
    label: `${h.label} — ${name}`,
    kind,
    profile: h.profile,
    tile: h.tile,
    workflow: make(h),
  })),
);

/** `extra_data` for a template's run, with the tile side the user chose. */
export function extraData(t: Template, tile = t.tile): Record<string, unknown> {
  return { nova: { profile: t.profile, tile_size: tile } };
}
