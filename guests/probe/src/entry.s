// Probe guest entry points (Intel syntax, assembled by rustc's global_asm!).
//
// _start64   Linux 64-bit boot protocol (e_entry, 0x200000): long mode, identity paging of at
//            least 1 GiB set up by the VMM, rsi = boot_params. Executes nothing privileged.
// _start_pvh PVH (XEN_ELFNOTE_PHYS32_ENTRY): 32-bit protected mode, paging off,
//            ebx = hvm_start_info. Builds its own GDT and 1 GiB identity map (2 MiB pages),
//            enables PAE, EFER.LME and paging, and far-jumps to 64-bit code.
// Both zero .bss, load the stack (in .bss) and call into Rust, which never returns.

    .section .text.entry64, "ax", @progbits
    .code64
    .global _start64
_start64:
    cld
    mov r12, rsi
    lea rdi, [rip + __bss_start]
    lea rcx, [rip + __bss_end]
    sub rcx, rdi
    xor eax, eax
    rep stosb
    lea rsp, [rip + probe_stack_top]
    xor ebp, ebp
    mov rdi, r12
    call probe_boot64
2:
    pause
    jmp 2b

    .section .text.entry_pvh, "ax", @progbits
    .code32
    .global _start_pvh
_start_pvh:
    cld
    mov esi, ebx
    mov edi, offset __bss_start
    mov ecx, offset __bss_end
    sub ecx, edi
    xor eax, eax
    rep stosb
    mov eax, offset probe_pvh_pdpt
    or eax, 3
    mov dword ptr [probe_pvh_pml4], eax
    mov eax, offset probe_pvh_pd
    or eax, 3
    mov dword ptr [probe_pvh_pdpt], eax
    xor ecx, ecx
3:
    mov eax, ecx
    shl eax, 21
    or eax, 0x83
    mov dword ptr [probe_pvh_pd + ecx * 8], eax
    inc ecx
    cmp ecx, 512
    jb 3b
    lgdt [probe_pvh_gdt_ptr]
    mov eax, cr4
    or eax, 0x20
    mov cr4, eax
    mov eax, offset probe_pvh_pml4
    mov cr3, eax
    mov ecx, 0xc0000080
    rdmsr
    or eax, 0x100
    wrmsr
    mov eax, cr0
    or eax, 0x80000001
    mov cr0, eax
    // ljmp 0x08:probe_pvh_long (ptr16:32 far jump, encoded by hand)
    .byte 0xea
    .long probe_pvh_long
    .word 0x08

    .code64
probe_pvh_long:
    mov eax, 0x10
    mov ds, eax
    mov es, eax
    mov ss, eax
    mov fs, eax
    mov gs, eax
    lea rsp, [rip + probe_stack_top]
    xor ebp, ebp
    mov edi, esi
    call probe_boot_pvh
4:
    pause
    jmp 4b

    .section .rodata.probe_gdt, "a", @progbits
    .balign 16
probe_pvh_gdt:
    .quad 0
    .quad 0x00af9a000000ffff
    .quad 0x00cf92000000ffff
probe_pvh_gdt_end:
    .balign 4
    .word 0
probe_pvh_gdt_ptr:
    .word probe_pvh_gdt_end - probe_pvh_gdt - 1
    .long probe_pvh_gdt

    .section .note.Xen, "a", @note
    .balign 4
    .long 4
    .long 8
    .long 18
    .asciz "Xen"
    .balign 4
    .quad _start_pvh
    .balign 4

    .section .bss.probe_boot, "aw", @nobits
    .balign 4096
probe_pvh_pml4:
    .zero 4096
probe_pvh_pdpt:
    .zero 4096
probe_pvh_pd:
    .zero 4096
probe_stack:
    .zero 65536
probe_stack_top:
