"""LLaVA processor that also tokenizes each prompt's question for the CLIP text tower (RC's ``"clip"`` guidance)."""

import re

import torch
from transformers import LlavaProcessor, ProcessorMixin

# Chat-template role markers of the LLaVA families (LLaVA-1.5 "USER:/ASSISTANT:", Mistral "[INST]", ChatML).
USER_TURN = re.compile(r"\bUSER\s*:|\bHuman\s*:|\[INST\]|<\|im_start\|>\s*user", re.IGNORECASE)
ASSISTANT_TURN = re.compile(
    r"\bASSISTANT\s*:|\bGPT\s*:|\[/INST\]|<\|im_end\|>|<\|im_start\|>\s*assistant", re.IGNORECASE
)


def extract_question(prompt: str, image_token: str) -> str:
    """The user's question in a prompt: the last user turn, without image placeholders and role markers."""
    user_turns = list(USER_TURN.finditer(prompt))
    text = prompt[user_turns[-1].end() :] if user_turns else prompt
    answer_start = ASSISTANT_TURN.search(text)
    text = text[: answer_start.start()] if answer_start else text
    return " ".join(text.replace(image_token, " ").split())


class LlavaRCProcessor(LlavaProcessor):
    r"""[`LlavaProcessor`] plus a guidance tokenizer (CLIP's) for the question of every prompt.

    Besides the LLaVA inputs it returns ``guidance_input_ids`` and ``guidance_attention_mask`` (B, T): the question
    (by default the last user turn without image placeholders and role markers; ``guidance_text=`` overrides it)
    tokenized for the CLIP text tower. A prompt without a question gets an all-zero mask row, which the model
    reads as "no text guidance" (the vision-only path).

    guidance_tokenizer: the CLIP tokenizer; saved to the ``guidance_tokenizer/`` subfolder.
    guidance_max_length: CLIP's context length (77).
    """

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        guidance_tokenizer=None,
        patch_size=None,
        vision_feature_select_strategy=None,
        chat_template=None,
        image_token="<image>",
        num_additional_image_tokens=0,
        guidance_max_length=77,
        **kwargs,
    ):
        # LlavaProcessor.__init__ counts two sub-processors; set its fields here and let ProcessorMixin take three.
        self.patch_size = patch_size
        self.num_additional_image_tokens = num_additional_image_tokens
        self.vision_feature_select_strategy = vision_feature_select_strategy
        self.image_token = tokenizer.image_token if hasattr(tokenizer, "image_token") else image_token
        self.image_token_id = tokenizer.encode(self.image_token, add_special_tokens=False)[0]
        self.guidance_max_length = guidance_max_length
        ProcessorMixin.__init__(self, image_processor, tokenizer, guidance_tokenizer, chat_template=chat_template)

    def __call__(self, images=None, text=None, guidance_text: str | list[str] | None = None, **kwargs):
        outputs = super().__call__(images=images, text=text, **kwargs)
        if text is None:
            return outputs
        prompts = [text] if isinstance(text, str) else list(text)
        if guidance_text is None:
            questions = [extract_question(prompt, self.image_token) for prompt in prompts]
        else:
            questions = [guidance_text] if isinstance(guidance_text, str) else guidance_text
            if not isinstance(questions, (list, tuple)) or not all(isinstance(q, str) for q in questions):
                raise TypeError(
                    f"guidance_text must be a str or a list of str (one per prompt), got {guidance_text!r}"
                )
            if len(questions) != len(prompts):
                raise ValueError(f"guidance_text has {len(questions)} entries for {len(prompts)} prompts")
        tokens = self.guidance_tokenizer(
            questions, padding=True, truncation=True, max_length=self.guidance_max_length, return_tensors="pt"
        )
        has_question = torch.tensor([bool(question.strip()) for question in questions]).unsqueeze(1)
        outputs["guidance_input_ids"] = tokens["input_ids"]
        outputs["guidance_attention_mask"] = tokens["attention_mask"] * has_question
        return outputs

    @property
    def model_input_names(self):
        return super().model_input_names + ["guidance_input_ids", "guidance_attention_mask"]


__all__ = ["LlavaRCProcessor", "extract_question"]
