//! Tokenizer and chat template of a GGUF model, usable alone (vocabulary only, as the
//! coordinator loads it to count tokens) or sharing the model an [`crate::Engine`] decodes with.

use std::path::Path;
use std::sync::{Arc, OnceLock};

use llama_cpp_2::llama_backend::LlamaBackend;
use llama_cpp_2::model::params::LlamaModelParams;
use llama_cpp_2::model::{LlamaChatMessage, LlamaChatTemplate, LlamaModel};
use llama_cpp_2::token::LlamaToken;

use crate::jinja::ChatTemplate;
use crate::{EngineError, TokenId};

/// Largest text `tokenize` accepts, in bytes; llama.cpp counts lengths in `i32`.
pub const TOKENIZE_TEXT_BYTES_MAX: usize = 256 << 20;

/// Environment variable that, when set, routes llama.cpp's own logging to `tracing` (targets
/// `llama.cpp` and `ggml`, at llama.cpp's levels). It is silenced otherwise: it prints a lot at
/// info level on every model load.
pub const LLAMA_LOG_ENV: &str = "FLEETGRID_LLAMA_LOG";

/// llama.cpp's switch for its tiled K-quant matrix multiplication, which it takes for batches of
/// eight rows or more and the row-by-row dot product below that: a row's numbers would depend on
/// how many rows were computed with it. The engine switches it off in its process (see
/// `crate::worker`); a reference llama.cpp run beside it should not inherit that.
pub const TILED_MATMUL_ENV: &str = "GGML_CPU_TILED_MM";

/// One chat message, as rendered by the model's chat template.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// The process-wide llama.cpp backend. llama.cpp initialises its backends once per process,
/// and `llama-cpp-2` refuses a second initialisation, so every engine and tokenizer shares it.
pub(crate) fn backend() -> Result<&'static LlamaBackend, EngineError> {
    static BACKEND: OnceLock<Result<LlamaBackend, String>> = OnceLock::new();
    BACKEND
        .get_or_init(|| {
            let enabled = std::env::var_os(LLAMA_LOG_ENV).is_some();
            llama_cpp_2::send_logs_to_tracing(
                llama_cpp_2::LogOptions::default().with_logs_enabled(enabled),
            );
            // Read once, at llama.cpp's first matrix multiplication, which cannot have run
            // before its backend is initialised here.
            std::env::set_var(TILED_MATMUL_ENV, "0");
            // A build without its CPU kernels linked in loads the best for this machine.
            #[cfg(feature = "cpu-dispatch")]
            {
                let variant = crate::cpu::dispatch::load()?;
                tracing::info!(%variant, "llama.cpp's CPU kernels chosen for this machine");
            }
            let backend = LlamaBackend::init().map_err(|error| error.to_string())?;
            // Before any context exists; only engines asking for the reference kernels need it.
            if let Err(reason) = crate::cpu::install_reference_switch() {
                tracing::warn!(%reason, "ggml's reference kernels are unavailable");
            }
            Ok(backend)
        })
        .as_ref()
        .map_err(|reason| EngineError::ModelLoad(format!("initialise llama.cpp backend: {reason}")))
}

/// Load a GGUF model from `path` with `params`, with a clear error for a missing file.
pub(crate) fn load_model(
    path: &Path,
    params: &LlamaModelParams,
) -> Result<LlamaModel, EngineError> {
    let backend = backend()?;
    if !path.is_file() {
        return Err(EngineError::ModelLoad(format!(
            "{} is not a readable file",
            path.display()
        )));
    }
    LlamaModel::load_from_file(backend, path, params).map_err(|error| {
        EngineError::ModelLoad(format!(
            "{}: {error} (not a supported GGUF model?)",
            path.display()
        ))
    })
}

/// Tokenizer and chat template; cheap to clone, `Send + Sync`.
#[derive(Clone)]
pub struct Tokenizer {
    model: Arc<LlamaModel>,
    vocab_size: u32,
    context_train: u32,
    /// `None` when the GGUF has no `tokenizer.chat_template`.
    chat_template: Option<LlamaChatTemplate>,
    /// The same template compiled as Jinja, or why it could not be.
    jinja: Result<ChatTemplate, String>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.vocab_size)
            .field("has_chat_template", &self.chat_template.is_some())
            .finish_non_exhaustive()
    }
}

impl Tokenizer {
    /// Load only the vocabulary and metadata of a GGUF model (no weights).
    ///
    /// # Errors
    ///
    /// `ModelLoad` when the file is missing or not a usable GGUF model.
    pub fn load(model_path: &Path) -> Result<Tokenizer, EngineError> {
        let params = LlamaModelParams::default().with_vocab_only(true);
        let model = load_model(model_path, &params)?;
        Ok(Self::from_model(Arc::new(model)))
    }

    pub(crate) fn from_model(model: Arc<LlamaModel>) -> Self {
        let vocab_size = u32::try_from(model.n_vocab()).unwrap_or(0);
        let chat_template = model.chat_template(None).ok();
        let jinja = jinja_template(&model, chat_template.as_ref());
        // A vocabulary-only model has no hyper-parameters loaded; its metadata has the value.
        let context_train = crate::budget::architecture_value(&model, "context_length")
            .and_then(|value| u32::try_from(value).ok())
            .unwrap_or_else(|| model.n_ctx_train());
        Self {
            model,
            vocab_size,
            context_train,
            chat_template,
            jinja,
        }
    }

    /// The model's chat template as Jinja, for conversations with tools.
    ///
    /// # Errors
    ///
    /// Why the model has none that renders: no template, or one minijinja cannot compile.
    pub fn jinja_template(&self) -> Result<&ChatTemplate, String> {
        self.jinja.as_ref().map_err(Clone::clone)
    }

    pub(crate) fn model(&self) -> &LlamaModel {
        &self.model
    }

    /// Number of tokens in the vocabulary; valid ids are `0..vocab_size`.
    #[must_use]
    pub fn vocab_size(&self) -> u32 {
        self.vocab_size
    }

    /// Every token's bytes as a grammar sees them, by id, and the token that ends an answer (the
    /// end-of-turn token where the model has one, else end-of-sequence). Control tokens (and
    /// tokens without text) are named `0xFF` followed by their name, llguidance's mark of a
    /// special token: a grammar never matches them as text.
    pub(crate) fn grammar_vocabulary(&self) -> (Vec<Vec<u8>>, TokenId) {
        let vocab = self.model.vocab();
        let words = (0..self.vocab_size)
            .map(|id| {
                let token = LlamaToken(TokenId::try_from(id).unwrap_or(TokenId::MAX));
                let piece = vocab.token_to_piece(token, false, None);
                if vocab.is_control(token) || piece.is_empty() {
                    let name = vocab.text(token).map_or_else(
                        || format!("<[{id}]>").into_bytes(),
                        |name| name.to_bytes().to_vec(),
                    );
                    let mut special = vec![0xFF];
                    special.extend_from_slice(if name.is_empty() { b"<[?]>" } else { &name });
                    special
                } else {
                    piece
                }
            })
            .collect();
        let end_of_turn = vocab.eot();
        let end = if self.is_valid(end_of_turn.0) {
            end_of_turn.0
        } else {
            vocab.eos().0
        };
        (words, end)
    }

    /// Whether `token` is an id of this vocabulary. llama.cpp aborts the process on unknown ids,
    /// so every id from outside is checked with this first.
    #[must_use]
    pub fn is_valid(&self, token: TokenId) -> bool {
        u32::try_from(token).is_ok_and(|id| id < self.vocab_size)
    }

    /// Tokenize `text`. Special tokens written in the text (such as `<|im_start|>` in a rendered
    /// chat template) are parsed as special tokens; `add_special` adds BOS/EOS as the model asks.
    ///
    /// # Errors
    ///
    /// `Tokenize` when the text is longer than [`TOKENIZE_TEXT_BYTES_MAX`].
    pub fn tokenize(&self, text: &str, add_special: bool) -> Result<Vec<TokenId>, EngineError> {
        if text.len() > TOKENIZE_TEXT_BYTES_MAX {
            return Err(EngineError::Tokenize(format!(
                "text of {} bytes is longer than the {TOKENIZE_TEXT_BYTES_MAX} bytes limit",
                text.len()
            )));
        }
        let tokens = self
            .model
            .vocab()
            .tokenize(text.as_bytes(), add_special, true);
        Ok(tokens.into_iter().map(|token| token.0).collect())
    }

    /// The raw bytes of one token (may be part of a UTF-8 character). Control tokens render as
    /// nothing; an id outside the vocabulary renders as nothing.
    #[must_use]
    pub fn piece(&self, token: TokenId) -> Vec<u8> {
        if !self.is_valid(token) {
            return Vec::new();
        }
        self.model
            .vocab()
            .token_to_piece(LlamaToken(token), false, None)
    }

    /// Text of a token sequence, lossy for broken UTF-8. Ids outside the vocabulary are skipped.
    #[must_use]
    pub fn detokenize(&self, tokens: &[TokenId]) -> String {
        let valid: Vec<LlamaToken> = tokens
            .iter()
            .filter(|&&token| self.is_valid(token))
            .map(|&token| LlamaToken(token))
            .collect();
        if valid.is_empty() {
            return String::new();
        }
        let bytes = self.model.vocab().detokenize(&valid, false, false);
        String::from_utf8_lossy(&bytes).into_owned()
    }

    /// Render `messages` with the chat template stored in the model (`tokenizer.chat_template`);
    /// `add_assistant_turn` appends the assistant prefix so the model answers next.
    ///
    /// # Errors
    ///
    /// `NoChatTemplate` when the model has none; `ChatTemplate` when llama.cpp does not support
    /// the template or a message contains a NUL byte.
    pub fn apply_chat_template(
        &self,
        messages: &[ChatMessage],
        add_assistant_turn: bool,
    ) -> Result<String, EngineError> {
        let template = self
            .chat_template
            .as_ref()
            .ok_or(EngineError::NoChatTemplate)?;
        let messages = messages
            .iter()
            .map(|message| LlamaChatMessage::new(message.role.clone(), message.content.clone()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|error| EngineError::ChatTemplate(error.to_string()))?;
        self.model
            .apply_chat_template(template, &messages, add_assistant_turn)
            .map_err(|error| EngineError::ChatTemplate(error.to_string()))
    }

    /// Whether `token` ends a generation (EOS, end of turn, ...).
    #[must_use]
    pub fn is_end_of_generation(&self, token: TokenId) -> bool {
        self.is_valid(token) && self.model.vocab().is_eog(LlamaToken(token))
    }

    /// The context length the model was trained with.
    #[must_use]
    pub fn context_train(&self) -> u32 {
        self.context_train
    }
}

/// `template` compiled as Jinja, with the texts of the model's BOS and EOS tokens.
fn jinja_template(
    model: &LlamaModel,
    template: Option<&LlamaChatTemplate>,
) -> Result<ChatTemplate, String> {
    let template = template.ok_or("the model has no chat template")?;
    let source = template
        .to_str()
        .map_err(|error| format!("the chat template is not UTF-8: {error}"))?;
    let vocab = model.vocab();
    // llama.cpp aborts on an id outside the vocabulary (a model without BOS has -1).
    let text = |token: LlamaToken| {
        (0..vocab.n_tokens())
            .contains(&token.0)
            .then(|| vocab.text(token))
            .flatten()
            .map(|text| text.to_string_lossy().into_owned())
            .unwrap_or_default()
    };
    ChatTemplate::new(source, &text(vocab.bos()), &text(vocab.eos()))
        .map_err(|error| error.to_string())
}
